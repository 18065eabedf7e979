"""A sweep's summary page (markdown) and plots (PNG) from its CSV, or several
CSVs of one device (`python -m perf.report CSV [CSV ...] [--stem OUT]`)."""

import os
import sys

import pandas as pd

PASSES = ["fwd", "bwd", "fwd+bwd"]
OURS, EAGER = "fused_sigxent", "torch_eager"
OURS_COMPILED, COMPILED = "fused_sigxent_compile", "torch_compile"
# Peaks under this count as this in memory ratios: RSS moves in 4 KiB pages
# and the interpreter's own small allocations add tens of KiB, so below
# 256 KiB a ratio would compare noise (a 64K-element float32 tensor is 256 KiB).
MEM_FLOOR_BYTES = 256 << 10
# The loss's goals against PyTorch, checked in the page's "Goals" list.
GOAL_MEDIAN_SPEEDUP, GOAL_WORST_SPEEDUP = 1.0, 0.8
GOAL_WORST_MEMORY = 1.0
GOAL_COMPILED = 1.25
CASE = ["case", "dtype", "label_dtype", "numel"]


def feature_set(row) -> str:
    """The sweep's feature names (sweep_loss.FEATURES) from the row's flags."""
    parts = [name for name, on in [("weight", row["weight"]), ("pos_weight", row["pos_weight"])] if on]
    if float(row["label_smoothing"]):
        parts.append("smoothing")
    if parts == ["weight", "pos_weight", "smoothing"]:
        return "both+smoothing"
    return "+".join(parts) or "plain"


def per_case(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per case and pass: each implementation's median_ms and
    peak_mem_bytes side by side (columns `<impl> ms`, `<impl> mem`), with
    the ratios the headline table summarizes:
      speed-up:  torch_eager ms / fused_sigxent ms (> 1: ours faster);
      memory:    fused_sigxent peak / torch_eager peak (< 1: ours leaner);
      compiled:  fused_sigxent_compile ms / torch_compile ms (< 1: ours
                 faster), and the same for peaks."""
    frame = frame.assign(features=frame.apply(feature_set, axis=1),
                         dtypes=frame["dtype"] + "/" + frame["label_dtype"])
    keys = CASE + ["features", "dtypes", "pass"]
    ms = frame.pivot_table(index=keys, columns="impl", values="median_ms", aggfunc="first")
    mem = frame.pivot_table(index=keys, columns="impl", values="peak_mem_bytes", aggfunc="first", dropna=False)
    table = ms.add_suffix(" ms").join(mem.add_suffix(" mem").astype(float))
    floor = lambda col: table[col].clip(lower=MEM_FLOOR_BYTES)
    if {f"{OURS} ms", f"{EAGER} ms"} <= set(table):
        table["speed-up"] = table[f"{EAGER} ms"] / table[f"{OURS} ms"]
    if {f"{OURS} mem", f"{EAGER} mem"} <= set(table):
        table["memory"] = floor(f"{OURS} mem") / floor(f"{EAGER} mem")
    if {f"{OURS_COMPILED} ms", f"{COMPILED} ms"} <= set(table):
        table["compiled"] = table[f"{OURS_COMPILED} ms"] / table[f"{COMPILED} ms"]
    if {f"{OURS_COMPILED} mem", f"{COMPILED} mem"} <= set(table):
        table["compiled memory"] = floor(f"{OURS_COMPILED} mem") / floor(f"{COMPILED} mem")
    return table.reset_index()


# (ratio column, headline header, worst = min or max)
HEADLINE = [
    ("speed-up", "speed-up vs eager (eager ms / ours)", "min"),
    ("memory", "peak mem ours / eager", "max"),
    ("compiled", "compiled: ours ms / PyTorch's", "max"),
    ("compiled memory", "compiled: ours peak / PyTorch's", "max"),
]


def _median_worst(values: pd.Series, worst: str) -> str:
    values = values.dropna()
    if values.empty:
        return ""
    return f"{values.median():.2f} / {getattr(values, worst)():.2f}"


def headline(cases: pd.DataFrame) -> pd.DataFrame:
    """Per pass: all cases, then per logits/labels dtype and feature set:
    "median / worst" of each ratio (worst: the lowest speed-up, the highest
    memory or compiled ratio)."""
    rows = []
    for pass_ in [p for p in PASSES if p in set(cases["pass"])]:
        at = cases[cases["pass"] == pass_]
        groups = [("all", "all", at)] + [(d, f, g) for (d, f), g in at.groupby(["dtypes", "features"], sort=True)]
        for dtypes, features, group in groups:
            row = {"pass": pass_, "logits/labels": dtypes, "features": features, "cases": len(group)}
            for column, header, worst in HEADLINE:
                if column in group:
                    row[header] = _median_worst(group[column], worst)
            rows.append(row)
    table = pd.DataFrame(rows)
    return table.loc[:, (table != "").any()]  # no column for a ratio nothing measured


def goals(cases: pd.DataFrame) -> list[str]:
    """The three goals, each with the figures that decide it."""
    lines = []

    def verdict(ok):
        return "**met**" if ok else "**not met**"

    if "speed-up" in cases:
        for pass_ in ["fwd+bwd", "fwd"]:
            s = cases.loc[cases["pass"] == pass_, "speed-up"].dropna()
            if len(s):
                lines.append(f"- eager speed, {pass_}: median {s.median():.2f}×, worst {s.min():.2f}× "
                             f"(goal ≥ {GOAL_MEDIAN_SPEEDUP}× median, ≥ {GOAL_WORST_SPEEDUP}× every case): "
                             + verdict(s.median() >= GOAL_MEDIAN_SPEEDUP and s.min() >= GOAL_WORST_SPEEDUP))
    if "memory" in cases and cases["memory"].notna().any():
        worst = cases.groupby("pass")["memory"].max()
        text = ", ".join(f"{p} {worst[p]:.2f}" for p in PASSES if p in worst)
        lines.append(f"- memory: worst ours / eager peak per pass {text} (goal ≤ {GOAL_WORST_MEMORY} every case): "
                     + verdict((worst <= GOAL_WORST_MEMORY).all()))
    if "compiled" in cases:
        s = cases.loc[cases["pass"] == "fwd+bwd", "compiled"].dropna()
        if len(s):
            lines.append(f"- compiled, fwd+bwd: ours / PyTorch's time median {s.median():.2f}, worst {s.max():.2f} "
                         f"(goal ≤ {GOAL_COMPILED} every case): " + verdict(s.max() <= GOAL_COMPILED))
    return lines


def plots(frame: pd.DataFrame, stem: str, baseline: str = EAGER) -> list[str]:
    """Against numel, a line per implementation, a panel per pass (median
    over the cases of that size): speed-up over `baseline`, GB/s, and peak
    memory (where measured). Needs matplotlib (the perf extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    title = str(frame["device"].iloc[0])
    eager = frame[frame["impl"] == baseline].set_index(CASE + ["pass"])["median_ms"]
    speed = frame.join(eager.rename("eager_ms"), on=CASE + ["pass"])
    speed["speed-up"] = speed["eager_ms"] / speed["median_ms"]
    # Log scale: a peak of 0 (a backward whose forward saved the gradient)
    # would vanish, so peaks are drawn at MEM_FLOOR_BYTES at least.
    memory = frame.assign(peak_mib=frame["peak_mem_bytes"].astype(float).clip(lower=MEM_FLOOR_BYTES) / 2**20)
    figures = [("speedup", speed, "speed-up", f"speed-up over {baseline}", True),
               ("gbps", frame, "gbps", "GB/s (bytes_min / median)", False),
               ("memory", memory, "peak_mib", f"peak MiB above the inputs (≥ {MEM_FLOOR_BYTES >> 10} KiB)", True)]
    paths = []
    for suffix, data, column, label, logy in figures:
        if data[column].notna().sum() == 0:
            continue
        fig, axes = plt.subplots(1, len(PASSES), figsize=(13, 3.8), sharey=True)
        for ax, pass_ in zip(axes, PASSES):
            by_impl = data[data["pass"] == pass_].groupby(["impl", "numel"])[column].median().unstack(0)
            if not by_impl.empty:
                by_impl.plot(ax=ax, marker="o", logx=True, logy=logy, legend=ax is axes[-1])
            ax.set_title(pass_)
            ax.set_xlabel("numel")
            ax.set_ylabel(f"{label}\n(median over cases)")
        if suffix == "speedup":
            for ax in axes:
                ax.axhline(1.0, color="grey", lw=0.8)
        fig.suptitle(title)
        fig.tight_layout()
        path = f"{stem}-{suffix}.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def page(frame: pd.DataFrame, csv_names: list[str], pngs: list[str]) -> str:
    """The summary page: what ran where, the goals, the headline table, the plots."""
    head = frame.iloc[0]
    cpu = str(head["device"]).startswith("cpu")
    cases = per_case(frame)
    n_cases = len(frame.drop_duplicates(CASE))
    impls = ", ".join(f"`{i}`" for i in frame["impl"].unique())
    lines = [
        f"# fused_sigxent performance on {head['device']}" + (": CPU only, no GPU on this machine" if cpu else ""),
        "",
        f"torch {head['torch_version']}, triton {head['triton_version']}, commit {head['commit']}; "
        f"{n_cases} cases × {impls} × {{fwd, bwd, fwd+bwd}} = {len(frame)} rows in "
        + ", ".join(f"`{n}`" for n in csv_names) + " (every row's times, bandwidth and memory are there).",
        "",
        "Times are the median per call of what the caller waits for: `fwd` is the forward building the graph, "
        "`bwd` is `loss.backward()` itself, autograd engine included, on a fresh graph per call (built untimed), "
        "`fwd+bwd` both"
        + (" (wall clock around loops of calls lasting ≥ 2 ms, in a fresh process per implementation × case, "
           "glibc's allocator settled first as a training loop has it after one step). " if cpu else
           " (`fwd` and `fwd+bwd` as device time: CUDA graph replays where those take under 1 ms, else CUDA "
           "events with the L2 flushed before each call; `bwd` as wall clock; host time per call is "
           "`perf.host_overhead`'s). ")
        + ("Peak memory is resident memory above the inputs (VmHWM after a reset, in a fresh process per "
           "implementation × case, glibc's mmap threshold at 128 KiB so freed blocks leave RSS; "
           f"peaks under {MEM_FLOOR_BYTES >> 10} KiB count as that in ratios). " if cpu else
           "Peak memory is CUDA's allocator peak above the inputs. ")
        + "`*_compile` is torch.compile of a function calling the loss.",
        "",
    ]
    goal_lines = goals(cases)
    if goal_lines:
        lines += ["## Goals", "", *goal_lines, ""]
    lines += [
        "## Headline",
        "",
        "Each cell is median / worst over the cases (worst: lowest speed-up, highest ratio). "
        "Speed-up = `torch_eager` ms / `fused_sigxent` ms; memory = `fused_sigxent` peak / `torch_eager` peak; "
        "compiled = `fused_sigxent_compile` / `torch_compile`. A `bwd` peak is above the graph the forward left, "
        "so where a forward already wrote the gradient its backward's peak is near 0 and the ratio extreme: "
        "compare memory on `fwd+bwd`.",
        "",
        headline(cases).to_markdown(index=False),
        "",
    ]
    if pngs:
        lines += ["## Plots", ""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in pngs] + [""]
    return "\n".join(lines)


def build(*csv_paths: str, stem: str | None = None) -> list[str]:
    """Writes <stem>.md and <stem>-*.png (stem: the first CSV's, by default)
    from one or more CSVs of the same device; returns their paths."""
    # A short hash such as 946e618 reads as a number (inf) unless told it is text.
    frame = pd.concat([pd.read_csv(p, dtype={"commit": str}) for p in csv_paths], ignore_index=True)
    stem = stem or os.path.splitext(csv_paths[0])[0]
    pngs = plots(frame, stem)
    with open(f"{stem}.md", "w") as f:
        f.write(page(frame, [os.path.basename(p) for p in csv_paths], pngs))
    return [f"{stem}.md"] + pngs


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
