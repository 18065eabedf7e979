"""Markdown summary and PNG plots from any sweep CSV (`python -m perf.report CSV`)."""

import os
import sys

import pandas as pd

KEYS = ["case", "dtype", "label_dtype", "numel", "pass"]


def summary(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per case and pass: time and % of copy bandwidth per
    implementation, and fused_sigxent's speed-up over the others."""
    table = frame.pivot_table(index=KEYS, columns="impl", values=["median_ms", "pct_copy_bw"], aggfunc="first")
    table.columns = [f"{impl} {'ms' if metric == 'median_ms' else '% copy bw'}" for metric, impl in table.columns]
    for base in ["torch_compile", "torch_eager"]:
        if f"{base} ms" in table and "fused_sigxent ms" in table:
            table[f"speed-up vs {base}"] = table[f"{base} ms"] / table["fused_sigxent ms"]
    return table.reset_index()


def plots(frame: pd.DataFrame, stem: str) -> list[str]:
    """GB/s and speed-up over torch_eager against numel, a line per
    implementation, for the fwd+bwd pass. Needs matplotlib (the perf extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    step = frame[frame["pass"] == "fwd+bwd"]
    by_impl = step.groupby(["impl", "numel"])["gbps"].median().unstack(0)
    fig, ax = plt.subplots(figsize=(6, 4))
    by_impl.plot(ax=ax, marker="o", logx=True)
    ax.set_ylabel("GB/s, fwd+bwd (median over cases)")
    ax.set_title(str(frame["device"].iloc[0]))
    paths = [f"{stem}-gbps.png"]
    fig.tight_layout()
    fig.savefig(paths[0])
    plt.close(fig)
    times = step.groupby(["impl", "numel"])["median_ms"].median().unstack(0)
    if "torch_eager" in times:
        fig, ax = plt.subplots(figsize=(6, 4))
        times.rdiv(times["torch_eager"], axis=0).plot(ax=ax, marker="o", logx=True)
        ax.set_ylabel("speed-up over torch_eager, fwd+bwd")
        ax.set_title(str(frame["device"].iloc[0]))
        fig.tight_layout()
        paths.append(f"{stem}-speedup.png")
        fig.savefig(paths[1])
        plt.close(fig)
    return paths


def build(*csv_paths: str, stem: str | None = None) -> list[str]:
    """Writes <stem>.md and <stem>-*.png (stem: the first CSV's, by default)
    from one or more CSVs of the same device; returns their paths."""
    frame = pd.concat([pd.read_csv(p) for p in csv_paths], ignore_index=True)
    stem = stem or os.path.splitext(csv_paths[0])[0]
    csv_path = ", ".join(os.path.basename(p) for p in csv_paths)
    head = frame.iloc[0]
    lines = [
        f"# fused_sigxent sweep: {head['device']}",
        "",
        f"torch {head['torch_version']}, triton {head['triton_version']}, commit {head['commit']}; "
        f"{len(frame)} measurements from `{csv_path}`. "
        "Times are medians (ms); % copy bw is bytes_min / median over the copy bandwidth measured in the same run.",
        "",
        summary(frame).to_markdown(index=False, floatfmt=".3g"),
        "",
    ]
    with open(f"{stem}.md", "w") as f:
        f.write("\n".join(lines))
    return [f"{stem}.md"] + plots(frame, stem)


if __name__ == "__main__":
    # python -m perf.report A.csv [B.csv ...] [--stem OUT]: several CSVs of one
    # device (a sweep run in parts) make one summary.
    argv = sys.argv[1:]
    stem = None
    if "--stem" in argv:
        i = argv.index("--stem")
        stem = argv[i + 1]
        del argv[i:i + 2]
    for path in build(*argv, stem=stem):
        print(path)
