"""`python -m perf.sass`: static predictions from the kernels' sm_90 SASS, with
no GPU. Per variant and autotune candidate: SASS instructions and MUFU per
element in the hot loop, registers, spills, and the fraction of copy
bandwidth that the instruction issue rate allows (perf/_sass.py).

Static predictions, not measurements: they bound the speed from the issue
rate alone (an H100 issues ISSUE_RATE thread-instructions/s and copies
COPY_BW bytes/s), assuming full occupancy and no other stall.
"""

import argparse
import datetime
import itertools
import json
import os
import sys
import tempfile

from perf import _sass
from perf._sass import Variant

# Logits/labels dtype pairs: bf16/fp16 models with hard (uint8) or soft labels,
# fp32, and the exact fp64 path.
PAIRS = [("bf16", "u8"), ("bf16", "bf16"), ("fp16", "u8"), ("fp16", "fp16"), ("fp32", "u8"), ("fp32", "fp32"),
         ("fp64", "fp64")]


def representative() -> list[Variant]:
    """The default sweep: every distinct hot loop a training or evaluation
    step runs, over every dtype pair for the three that matter most."""
    out = []
    for logits, labels in PAIRS:
        out += [
            Variant("fwd", logits, labels),  # a training step's forward (gradient in the forward)
            Variant("fwd", logits, labels, "class", "class"),  # class weights + pos_weight (+ smoothing)
            Variant("bwd", logits, labels, reduction="none"),  # recompute: the incoming gradient per element
        ]
    out += [
        Variant("fwd", "bf16", "u8", reduction="none", grads=""),  # elementwise loss, evaluation
        Variant("fwd", "fp32", "fp32", reduction="none", grads=""),
        Variant("fwd", "bf16", "u8", grads=""),  # reduced loss under no_grad
        Variant("fwd", "bf16", "bf16", reduction="sum", grads="both"),  # soft labels that require grad
        Variant("fwd", "bf16", "u8", "scalar"),
        Variant("fwd", "bf16", "u8", pos_weight="class"),
        Variant("fwd", "bf16", "u8", "sample"),  # a [batch_size] weight (TF)
        Variant("fwd", "bf16", "u8", "full", "full"),
        Variant("fwd", "bf16", "u8", "class", reduction="tf_mean", grads=""),  # counts the weights
        Variant("fwd", "bf16", "u8", "full", reduction="nonzero", grads=""),
        Variant("fwd", "bf16", "u8", "class", "class", reduction="none", grads=""),
        Variant("fwd", "bf16", "u8", "class", "class", classes=1031),  # classes not a multiple of 8
        Variant("fwd", "fp32", "fp32", "class", "class", classes=1031),
        Variant("fwd", "bf16", "u8", "class", "class", classes=5),  # fewer classes than a chunk
        Variant("fwd", "bf16", "u8", int64=True),
        Variant("bwd", "bf16", "u8"),  # reduced loss, recomputed (a second backward)
        Variant("bwd", "fp32", "fp32"),
        Variant("bwd", "bf16", "bf16", reduction="none", grads="both"),
        Variant("bwd", "bf16", "u8", "class", "class", reduction="tf_mean"),  # weighted recompute
        Variant("bwd", "bf16", "u8", "full", reduction="nonzero"),
        # the focal loss: hard labels (one exp more), soft, class indices
        Variant("fwd", "bf16", "u8", focal="hard"),
        Variant("fwd", "fp32", "u8", focal="hard"),
        Variant("fwd", "bf16", "bf16", focal="soft"),
        Variant("fwd", "fp32", "fp32", focal="soft"),
        Variant("fwd", "bf16", "index", focal="hard"),
        Variant("fwd", "bf16", "u8", "class", focal="hard", reduction="none", grads=""),
        Variant("bwd", "bf16", "u8", reduction="none", focal="hard"),
        Variant("bwd", "fp32", "fp32", reduction="none", focal="soft"),
        Variant("scale", "bf16", "u8"),
        Variant("scale", "bf16", "bf16", grads="both"),
        Variant("scale", "fp32", "fp32"),
        Variant("scale", "fp64", "fp64"),
    ]
    return out


def everything() -> list[Variant]:
    """Every variant the public API can launch, up to equivalent dtypes."""
    pairs = PAIRS + [("bf16", "fp32"), ("fp16", "fp32"), ("fp64", "u8")]
    coefficients = [None, "scalar", "class", "sample", "full"]
    out = []
    for (logits, labels), w, pw in itertools.product(pairs, coefficients, [None, "class", "full"]):
        soft = labels != "u8"
        modes = [("none", ""), ("mean", ""), ("sum", "logits"), ("mean", "logits")]
        if w not in (None, "scalar"):
            modes += [("tf_mean", ""), ("nonzero", "")]
        if soft:
            modes += [("sum", "both")]
        for reduction, grads in modes:
            out.append(Variant("fwd", logits, labels, w, pw, reduction, grads))
        for reduction, grads in [("none", "logits"), ("mean", "logits")] + [("none", "both")] * soft:
            out.append(Variant("bwd", logits, labels, w, pw, reduction, grads))
    for (logits, labels), w in itertools.product(pairs + [("bf16", "index"), ("fp32", "index")], [None, "class"]):
        focal = "hard" if labels in ("u8", "index") else "soft"
        for reduction, grads in [("none", ""), ("mean", "logits")]:
            out.append(Variant("fwd", logits, labels, w, None, reduction, grads, focal=focal))
        out.append(Variant("bwd", logits, labels, w, None, "none", "logits", focal=focal))
    for logits, labels in pairs:
        out.append(Variant("scale", logits, labels))
        if labels != "u8":
            out.append(Variant("scale", logits, labels, grads="both"))
    return out


def _measure(v: Variant) -> list[dict] | str:
    try:
        return _sass.measure(v)
    except Exception as e:  # one broken variant is reported, the sweep goes on
        return f"{v.name}: {type(e).__name__}: {e}"


def sweep(variants: list[Variant], jobs: int) -> tuple[list[dict], list[str]]:
    """(rows for every variant x candidate, errors), compiled `jobs` at a time."""
    if jobs <= 1:
        results = [_measure(v) for v in variants]
    else:
        import concurrent.futures
        import multiprocessing

        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            results = list(pool.map(_measure, variants))
    rows = [row for r in results if not isinstance(r, str) for row in r]
    return rows, [r for r in results if isinstance(r, str)]


COLUMNS = ["variant", "BLOCK", "num_warps", "sass_per_elem", "budget_sass_per_elem", "mufu_per_elem", "regs",
           "spill_bytes", "loop_ldg128", "loop_stg128", "bytes_per_elem", "issue_pct_at_copy_bw",
           "predicted_pct_copy_bw"]
NAMES = {"sass_per_elem": "SASS/elem", "budget_sass_per_elem": "budget", "mufu_per_elem": "MUFU/elem",
         "spill_bytes": "spill B", "loop_ldg128": "LDG.128", "loop_stg128": "STG.128", "bytes_per_elem": "B/elem",
         "issue_pct_at_copy_bw": "issue % at copy BW", "predicted_pct_copy_bw": "pred. % copy BW",
         "num_warps": "warps"}


def table(rows: list[dict]) -> str:
    """Every variant x candidate."""
    import pandas as pd

    frame = pd.DataFrame(rows)[COLUMNS].rename(columns=NAMES)
    return frame.to_markdown(index=False, floatfmt="g")


def summary(rows: list[dict]) -> str:
    """One line per variant over its candidates: SASS/elem min-max, the
    largest MUFU/elem, registers, spills and share of the issue rate at copy
    bandwidth, the lowest predicted fraction of copy bandwidth."""
    import pandas as pd

    frame = pd.DataFrame(rows)
    out = []
    for name, group in frame.groupby("variant", sort=False):
        lo, hi = group["sass_per_elem"].min(), group["sass_per_elem"].max()
        limit = group["budget_sass_per_elem"].iloc[0]
        out.append({
            "variant": name, "candidates": len(group), "SASS/elem": f"{lo:.1f}-{hi:.1f}",
            "budget": "" if pd.isna(limit) else f"{limit:g}", "MUFU/elem": f"{group['mufu_per_elem'].max():g}",
            "regs (max)": int(group["regs"].max()), "spill B": int(group["spill_bytes"].max()),
            "B/elem": f"{group['bytes_per_elem'].iloc[0]:g}",
            "issue % at copy BW": f"{group['issue_pct_at_copy_bw'].max():g}",
            "pred. % copy BW": f"{group['predicted_pct_copy_bw'].min():g}",
        })
    return pd.DataFrame(out).to_markdown(index=False)


def over_budget(rows: list[dict]) -> list[str]:
    return [f"{r['variant']} BLOCK={r['BLOCK']} warps={r['num_warps']}: {r['sass_per_elem']} SASS/elem > "
            f"{r['budget_sass_per_elem']:g}" for r in rows
            if r["budget_sass_per_elem"] is not None and r["sass_per_elem"] > r["budget_sass_per_elem"]]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="every variant (long), not the representative ones")
    parser.add_argument("--match", default="", help="only variants whose name contains this")
    parser.add_argument("--variants", help="a JSON list of Variant fields (perf/_sass.py) instead of a sweep")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", help="CSV path (default perf/results/sass-sm90-<date>.csv)")
    parser.add_argument("--no-csv", action="store_true")
    parser.add_argument("--json", action="store_true", help="print the rows as one JSON line instead of a table")
    args = parser.parse_args(argv)

    if args.variants:
        variants = [Variant(**fields) for fields in json.loads(args.variants)]
    else:
        variants = everything() if args.all else representative()
    variants = [v for v in variants if args.match in v.name]
    rows, errors = sweep(variants, args.jobs)
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    if args.json:
        print(json.dumps(rows))
    else:
        print(f"Static predictions from sm_90 SASS (no GPU): issue rate {_sass.ISSUE_RATE / 1e12:.2f} T "
              f"thread-instr/s, copy bandwidth {_sass.COPY_BW / 1e12:.1f} TB/s; SASS/elem counts the hot "
              "loop's instructions over the elements each thread takes per iteration.\n")
        print(table(rows))
        print("\nPer variant, over its candidates:\n")
        print(summary(rows))
        for line in over_budget(rows):
            print(f"over budget: {line}")
    if not args.no_csv:
        import pandas as pd

        from perf import _bench

        out = args.out or os.path.join(_bench.RESULTS, f"sass-sm90-{datetime.date.today()}.csv")
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        pd.DataFrame(rows).to_csv(out, index=False)
        print(f"wrote {out}", file=sys.stderr)
    if errors:
        sys.exit(1)


def _environment() -> None:
    """Compiled kernels (not the interpreter's), FP fusion as the launchers
    ask for it, and a compile cache of our own so reruns are quick."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        os.execve(sys.executable, [sys.executable, "-m", "perf.sass", *sys.argv[1:]], env)
    os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(tempfile.gettempdir(), "fused_sigxent-sass-cache"))


if __name__ == "__main__":
    _environment()
    main()
