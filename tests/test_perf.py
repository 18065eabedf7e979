"""The perf scripts run on the CPU (forced: a GPU box's `make test` must not
start a GPU sweep): the sweep in --quick mode writes SPEC section 4's columns
exactly and its report builds from the CSV; the host-overhead benchmark runs."""

import os
import subprocess
import sys

import pandas as pd

from perf import _bench, host_overhead, report, sweep_loss, train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_sweep_writes_spec_columns_and_report(tmp_path, monkeypatch):
    monkeypatch.delenv("FUSED_SIGXENT_BACKEND", raising=False)
    out = tmp_path / "sweep.csv"
    sweep_loss.main(["--quick", "--device", "cpu", "--out", str(out)])
    frame = pd.read_csv(out)
    assert list(frame.columns) == _bench.COLUMNS
    assert set(frame["pass"]) == {"fwd", "bwd", "fwd+bwd"}
    assert set(frame["impl"]) >= {"fused_sigxent", "torch_eager"}
    assert (frame["median_ms"] >= 0).all() and (frame["bytes_min"] > 0).all()
    assert frame["device"].str.startswith("cpu").all()
    assert os.path.exists(tmp_path / "sweep.md")
    text = (tmp_path / "sweep.md").read_text()
    assert "speed-up vs torch_eager" in text and "fused_sigxent ms" in text
    assert report.build(str(out))[0].endswith(".md")


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
    train_step.main(["--device", "cpu", "--out", str(out)])
    frame = pd.read_csv(out)
    assert set(frame["model"]) == {"mlp_multilabel", "ctr_embedding_bag"}
    assert ((frame["loss_share"] > 0) & (frame["loss_share"] < 1.5)).all()


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
    assert set(frame["provider"]) == {"fused_sigxent", "torch_eager"}
    assert set(frame["mode"]) == {"fwd", "fwd+bwd"} and len(frame) == 4
    assert (frame["p50"] > 0).all() and (frame["unit"] == "us").all()
    assert "median ours / eager host time, fwd+bwd" in run.stdout
