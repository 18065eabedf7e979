"""The perf scripts run on the CPU (forced: a GPU box's `make test` must not
start a GPU sweep): the sweep in --quick mode writes SPEC section 4's columns
exactly, with every pass timed (no 0.0 medians) and peak memory measured, and
its report is a short page with the headline table; the memory measurement
sees a known allocation; the timing loop times what it is given; the
training-step and host-overhead benchmarks run."""

import os
import subprocess
import sys

import pandas as pd
import pytest
import torch

from perf import _bench, _memory, host_overhead, report, sweep_loss, train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_rss = pytest.mark.skipif(not _memory.rss_available(), reason="needs Linux's /proc/self/clear_refs")


@needs_rss
def test_quick_sweep_writes_spec_columns_and_report(tmp_path, monkeypatch):
    monkeypatch.delenv("FUSED_SIGXENT_BACKEND", raising=False)
    out = tmp_path / "sweep.csv"
    sweep_loss.main(["--quick", "--device", "cpu", "--out", str(out)])
    frame = pd.read_csv(out)
    assert list(frame.columns) == _bench.COLUMNS
    assert set(frame["pass"]) == {"fwd", "bwd", "fwd+bwd"}
    assert set(frame["impl"]) == set(sweep_loss.IMPLS)
    assert frame["device"].str.startswith("cpu").all()
    # Every pass timed as a call the user waits for: no 0.0 (a backward whose
    # gradient the forward wrote still costs its dispatch and autograd).
    assert (frame["median_ms"] > 0).all() and (frame["p20_ms"] > 0).all()
    assert (frame["p20_ms"] <= frame["median_ms"]).all() and (frame["median_ms"] <= frame["p80_ms"]).all()
    assert (frame["bytes_min"] > 0).all() and frame["gbps"].notna().all()
    # Peak memory on every CPU row; a training forward or step at least
    # writes something (the loss, a gradient), never gigabytes here.
    assert frame["peak_mem_bytes"].notna().all()
    assert (frame["peak_mem_bytes"] < 64 << 20).all()
    text = (tmp_path / "sweep.md").read_text()
    lines = text.splitlines()
    assert "CPU only" in lines[0]
    assert "## Headline" in text and "speed-up vs eager" in text and "peak mem ours / eager" in text
    assert "compiled: ours ms / PyTorch's" in text
    assert "inf" not in text and "nan" not in text
    assert len(lines) < 80
    assert "(sweep-speedup.png)" in text and os.path.exists(tmp_path / "sweep-speedup.png")
    assert report.build(str(out))[0].endswith(".md")


def test_report_headline_ratios(tmp_path):
    # Two cases: eager 2 and 4 ms, ours 1 and 8 ms: speed-ups 2 and 0.5
    # (median 1.25, worst 0.5); peaks 1 MiB vs 2 MiB and 4 vs 2: memory ratios
    # 0.5 and 2 (median 1.25, worst 2); compiled 3 / 2 ms both: 1.5.
    # A short hash that reads as a number (946e618: 9.46e620, inf) stays text.
    base = dict(device="cpu (2 cores, no GPU)", torch_version="2", triton_version="", commit="946e618",
                case="plain/mean",
                dtype="float32", label_dtype="float32", weight=False, pos_weight=False, label_smoothing=0.0,
                reduction="mean", shape="", bytes_min=1, gbps=1.0, pct_copy_bw=1.0, p20_ms=0.0, p80_ms=0.0)
    rows = []
    for numel, ours, eager, ours_mem, eager_mem in [(1, 1.0, 2.0, 1, 2), (2, 8.0, 4.0, 4, 2)]:
        for impl, ms, mem in [("fused_sigxent", ours, ours_mem), ("torch_eager", eager, eager_mem),
                              ("fused_sigxent_compile", 3.0, 1), ("torch_compile", 2.0, 1)]:
            for pass_ in ["fwd", "bwd", "fwd+bwd"]:
                rows.append(dict(base, impl=impl, numel=numel, **{"pass": pass_}, median_ms=ms,
                                 peak_mem_bytes=mem << 20))
    path = tmp_path / "r.csv"
    pd.DataFrame(rows, columns=_bench.COLUMNS).to_csv(path, index=False)
    report.build(str(path))
    text = (tmp_path / "r.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| fwd+bwd | all"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[3:7] == ["2", "1.25 / 0.50", "1.25 / 2.00", "1.50 / 1.50"]
    assert "eager speed, fwd+bwd: median 1.25×, worst 0.50×" in text and "**not met**" in text
    assert "commit 946e618" in text


def test_timing_loop_times_each_call_with_its_own_setup():
    dev = torch.device("cpu")
    states, seen = [], []

    def setup():
        states.append(object())
        return states[-1]

    med, p20, p80 = _bench.time_ms(seen.append, dev, reps=5, setup=setup)
    assert seen == states and len(set(map(id, seen))) == len(seen)
    # A trivial call is still timed (loops of calls last >= 2 ms), never 0.
    assert 0 < p20 <= med <= p80 < 1.0
    assert _bench.time_ms(lambda: None, dev, reps=5)[0] > 0


@needs_rss
def test_memory_child_sees_a_known_allocation():
    big, nothing = _memory.run_children("_memory", [dict(allocate_mib=64), dict(allocate_mib=0)])
    mib = 1 << 20
    assert 60 * mib <= big["peak"] < 72 * mib, big
    assert nothing["peak"] < 8 * mib, nothing


def test_bytes_min_model():
    import torch

    x, z = torch.empty(4, 10, dtype=torch.bfloat16), torch.empty(4, 10, dtype=torch.uint8)
    w = torch.empty(10, dtype=torch.bfloat16)
    # fwd, mean: 80 B logits + 40 B labels + 20 B weight + a 2 B loss.
    assert sweep_loss.bytes_min(x, z, w, None, "mean", "fwd") == 142
    # fwd+bwd, mean: the above plus an 80 B gradient.
    assert sweep_loss.bytes_min(x, z, w, None, "mean", "fwd+bwd") == 222


def test_train_step_runs_on_cpu(tmp_path):
    out = tmp_path / "steps.csv"
    train_step.main(["--device", "cpu", "--impl", "fused_sigxent,fused_sigxent_compile", "--out", str(out)])
    frame = pd.read_csv(out)
    assert set(frame["model"]) == {"mlp_multilabel", "ctr_embedding_bag"}
    assert set(frame["impl"]) == {"fused_sigxent", "fused_sigxent_compile"}
    assert ((frame["loss_share"] > 0) & (frame["loss_share"] < 1.5)).all()
    if _memory.rss_available():
        assert (frame["peak_mem_bytes"] > 0).all()


def test_host_overhead_runs_through_triton_launch_path(tmp_path):
    # A process of its own: the kernels must be decorated as for a GPU
    # (TRITON_INTERPRET unset), then compiled for a stand-in sm_90 driver.
    out = tmp_path / "host.csv"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FUSED_SIGXENT_BACKEND")}
    run = subprocess.run([sys.executable, "-m", "perf.host_overhead", "--quick", "--repeat", "3", "--rounds", "3",
                          "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    # Every candidate asks for FP fusion by name: Triton 3.9 warns otherwise.
    assert "TRITON_DEFAULT_FP_FUSION" not in run.stderr
    frame = pd.read_csv(out)
    assert list(frame.columns) == host_overhead.COLUMNS
    assert set(frame["provider"]) == {"fused_sigxent", "torch_eager", "python_function_floor"}
    assert set(frame["mode"]) == {"fwd", "fwd+bwd"} and len(frame) == 6
    assert (frame["p50"] > 0).all() and (frame["unit"] == "us").all()
    assert "median ours / eager host time, fwd+bwd" in run.stdout
    assert "median floor / eager host time, fwd+bwd" in run.stdout
