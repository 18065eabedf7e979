"""Launch plans (kernels/_launch.py): a plan's first launch goes through
Triton's JITFunction.run; once Triton's own binder and cache key name the
kernel it launched, later launches call that kernel directly. A new
specialization (a pointer's alignment) makes a plan of its own; a hook, or
a lookup that disagrees with Triton, keeps launches on JITFunction.run.
Checked with the kernels compiled for sm_90 and a stand-in driver
(tests/kernels/launch_probe.py)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def facts():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FUSED_SIGXENT_BACKEND")}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, os.path.join(ROOT, "tests"), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "kernels", "launch_probe.py")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    return json.loads(run.stdout)


def test_compiled_kernels_launch_directly(facts):
    # (direct launches, JITFunction.run launches) of a fwd+bwd: forward, scale.
    assert facts["first_call"] == [0, 2]
    assert facts["second_call"] == [2, 0]
    assert facts["direct_enabled"] == [True, True]


def test_a_new_alignment_gets_its_own_kernel(facts):
    assert facts["shifted_first_call"] == [1, 1]  # the forward's new plan goes through Triton; scale is unchanged
    assert facts["shifted_second_call"] == [2, 0]
    assert facts["fwd_plans"] == 2
    assert facts["shifted_kernel_differs"]


def test_a_pre_run_hook_sends_launches_through_triton(facts):
    assert facts["with_hook"] == [1, 1]
    assert facts["after_hook"] == [2, 0]


def test_a_lookup_that_disagrees_with_triton_keeps_launches_on_triton(facts):
    assert facts["after_disagreement"] == [True, False]
    assert facts["after_disagreement_call"] == [1, 1]
