"""The perf scripts run on the CPU (forced: a GPU box's `make test` must not
start a GPU sweep): the sweep in --quick mode writes the report's columns
exactly, with every pass timed (no 0.0 medians) and peak memory measured, and
its report is a short page with the headline table; the memory measurement
sees a known allocation; the timing loop times what it is given; the
training-step and host-overhead benchmarks run; `make perf` runs the default
plan; the GPU check's plan, budgets, runner and archive work without a GPU,
and its config grid runs against a stand-in GPU."""

import importlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time

import pandas as pd
import pytest
import torch

from perf import _bench, _memory, gpu_check, host_overhead, linear_loss, plan, report, sweep_loss, train_step

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
needs_rss = pytest.mark.skipif(not _memory.rss_available(), reason="needs Linux's /proc/self/clear_refs")


@needs_rss
def test_quick_sweep_writes_report_columns_and_report(tmp_path, monkeypatch):
    monkeypatch.delenv("FUSED_SIGXENT_BACKEND", raising=False)
    out = tmp_path / "sweep.csv"
    sweep_loss.main(["--quick", "--device", "cpu", "--sample-ms", "100", "--out", str(out)])
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
    # The GPU check's summary reads such a CSV.
    assert "cases; fwd+bwd median ms" in "\n".join(gpu_check._loss_table(str(out)))


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


# What `make perf` sweeps: literal here, so a change to the plan is a change to this test too.
# The distributed sweeps run gloo ranks on the CPU whatever the device, at small sizes.
DISTRIBUTED_PLAN = {"siglip-ranks": (["512"], 6), "class-parallel": (["16384"], 4)}
DEFAULT_PLAN = {
    "cpu": {"loss": (["4194304"], 4), "focal": (["65536", "1048576"], 4),
            "linear+siglip": (["2048", "512", "4096"], 3), **DISTRIBUTED_PLAN},
    "cuda": {"loss": (["1048576", "16777216", "67108864", "268435456"], 32), "focal": (["1048576", "16777216",
             "67108864"], 12), "linear+siglip": (["8192", "65536"], 3), **DISTRIBUTED_PLAN},
}


def test_make_perf_runs_the_default_plan(capsys):
    # make perf is `python -m perf` with no arguments ...
    if shutil.which("make"):
        # (--no-print-directory: under `make test`, a nested make names its directory.)
        dry = subprocess.run(["make", "-n", "--no-print-directory", "perf"], cwd=ROOT, capture_output=True,
                             text=True, timeout=60)
        assert dry.returncode == 0, dry.stderr
        assert re.search(r"python\S* -m perf$", dry.stdout.strip().splitlines()[-1])
    # ... whose dry run lists the default plan's sweeps and cases on this machine's device.
    main = importlib.import_module("perf.__main__").main
    assert main(["--dry-run"]) == 0
    text = capsys.readouterr().out
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert text.startswith(f"default plan on {device}:")
    sweeps = re.findall(r"^(\S+): python -m (\S+) (.*)$", text, re.M)
    assert [name for name, _, _ in sweeps] == ["loss", "focal", "linear+siglip", "siglip-ranks", "class-parallel"]
    blocks = re.split(r"^\S+: python -m .*$", text, flags=re.M)[1:]
    for (name, module, args), block in zip(sweeps, blocks):
        sizes, n_cases = DEFAULT_PLAN[device][name]
        cases = [line.strip() for line in block.splitlines() if line.startswith("    ")]
        assert len(cases) == n_cases, (name, cases)
        for size in sizes:
            assert re.search(rf"(=|\b){size}\b", " ".join(cases)), (name, size, cases)
        assert "--out " + os.path.join(plan.RESULTS, "") in args


def test_gpu_check_dry_run_lists_steps_within_eight_minutes(tmp_path):
    run = subprocess.run([sys.executable, "-m", "perf.gpu_check", "--dry-run", "--out", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    steps = re.findall(r"^(\S+) \[(\d+) s\]: .*\n    (.*)$", run.stdout, re.M)
    assert [name for name, _, _ in steps] == ["env", "gpu-tests", "host-overhead", "loss-bf16-uint8", "loss-float32",
                                             "focal", "linear-siglip", "config-grid"]
    budgets = [int(b) for _, b, _ in steps]
    # Every step killed at its budget, SIGKILL after the grace, and the packing:
    # within the runner's cap, which leaves a minute of 8 for make's install.
    assert sum(budgets) + len(budgets) * (gpu_check.GRACE_S + 1) + gpu_check.RESERVE_S <= gpu_check.TOTAL_S <= 7 * 60
    commands = {name: command for name, _, command in steps}
    assert "-m pytest -q -m gpu" in commands["gpu-tests"] and "--junitxml" in commands["gpu-tests"]
    assert "perf.host_overhead --device cuda" in commands["host-overhead"]
    assert "--pairs bfloat16/uint8" in commands["loss-bf16-uint8"] and "--pairs float32/float32" in commands["loss-float32"]
    for name in ("loss-bf16-uint8", "loss-float32", "focal"):
        assert "--numel 67108864,16777216,1048576" in commands[name]
    assert "--case dense,siglip" in commands["linear-siglip"]
    assert f"archive {tmp_path / gpu_check.ARCHIVE}" in run.stdout
    # Where the archive goes: --out, else $OUT, else perf/results/gpu-check/.
    assert gpu_check.out_dir("/a", {"OUT": "/b"}) == "/a"
    assert gpu_check.out_dir(None, {"OUT": "/b"}) == "/b"
    assert gpu_check.out_dir(None, {}) == os.path.join(ROOT, "perf", "results", "gpu-check")


def test_gpu_check_steps_parse_their_arguments(capsys):
    # Each sweep step's own arguments, listed by that sweep's dry run (no GPU needed to plan one).
    for step in gpu_check.steps("/tmp/gpu-check-test"):
        module = step.argv[2] if step.argv[1:2] == ("-m",) else None
        if module in ("perf.sweep_loss", "perf.sweep_focal", "perf.linear_loss", "perf.config_grid"):
            importlib.import_module(module).main(list(step.argv[3:]) + ["--dry-run"])
            listed = capsys.readouterr().out.splitlines()
            assert listed, step.name
            if step.name.startswith("loss"):
                assert len(listed) == 12 and listed[0].startswith("numel=67108864 C=1000"), listed
            if step.name == "config-grid":
                assert len(listed) >= 15 and listed[0].endswith("x plain,weight,pos_weight")


def test_gpu_check_runner_keeps_budgets_and_packs_everything(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    py = sys.executable
    steps = [
        gpu_check.Step("ok", "prints the interpreter setting", 20,
                       (py, "-c", "import os; print('TRITON_INTERPRET=' + os.environ['TRITON_INTERPRET'])")),
        gpu_check.Step("fails", "exits 3", 20, (py, "-c", "raise SystemExit(3)")),
        gpu_check.Step("slow", "outlives its budget", 1, (py, "-c", "import time; print('started', flush=True); time.sleep(60)")),
        gpu_check.Step("missing", "no such program", 5, (str(tmp_path / "nothing"),)),
    ]
    started = time.monotonic()
    results = gpu_check.run_all(steps, str(work))
    assert time.monotonic() - started < 20
    status = {r["step"]: r["status"] for r in results}
    assert status["ok"] == "ok" and status["fails"] == "failed (exit 3)"
    assert status["slow"].startswith("killed at") and status["missing"].startswith("could not start")
    slow = next(r for r in results if r["step"] == "slow")
    assert slow["wall_s"] < 1 + gpu_check.GRACE_S + 1
    assert "TRITON_INTERPRET=0" in (work / "ok.log").read_text()
    assert "started" in (work / "slow.log").read_text()
    # No time left: a step is skipped, not started.
    skipped = gpu_check.run_all(steps[:1], str(work), total_s=gpu_check.RESERVE_S + 1)
    assert skipped[0]["status"].startswith("skipped")
    text = gpu_check.summary(str(work), results, 3.0)
    assert "| slow | killed at" in text and "Last lines of the log" in text
    (work / "summary.md").write_text(text)
    path = gpu_check.pack(str(work), str(out))
    assert path == str(out / gpu_check.ARCHIVE)
    with tarfile.open(path) as tar:
        names = set(tar.getnames())
    assert {"gpu-check/summary.md", "gpu-check/ok.log", "gpu-check/slow.log"} <= names


def test_config_grid_runs_against_a_stand_in_gpu(tmp_path):
    # A process of its own, kernels compiled for a stand-in sm_90 and launched
    # as no-ops (perf.host_overhead's): the GPU script's code paths, no GPU.
    out = tmp_path / "grid.csv"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FUSED_SIGXENT_BACKEND")}
    run = subprocess.run([sys.executable, "-m", "perf.config_grid", "--device", "cpu", "--stand-in", "--numel", "65536",
                          "--limit", "1", "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    from perf import config_grid

    frame = pd.read_csv(out)
    assert list(frame.columns) == config_grid.COLUMNS
    assert (frame["status"] == "ok").all(), frame["status"].tolist()
    assert list(frame["source"]) == ["tuner"] * 3 + ["grid"] * 3
    assert set(frame["feature"]) == set(config_grid.FEATURES) and frame["ptx_md5"].notna().all()
    assert (tmp_path / "grid.md").read_text().startswith("# Forward launch configs")
    assert "fastest per feature" in "\n".join(gpu_check._best_configs(str(out)))


def test_linear_gpu_targets_verdicts():
    rows = []
    for case, ms, peak in [("dense", 50.0, 5 << 30), ("siglip", 60.0, 1 << 30)]:
        spec = linear_loss.GPU_CASES[case]
        rows.append(dict(impl="fused_sigxent", case=case, B=spec["B"], H=spec["H"], C=spec["C"], K=spec["K"],
                         **{"pass": "fwd+bwd"}, median_ms=ms, input_bytes=1 << 20, peak_mem_bytes=peak))
    checks = {c["case"]: c["verdict"] for c in linear_loss.target_checks(pd.DataFrame(rows))}
    assert checks == {"dense": "pass", "siglip": "FAIL"}
