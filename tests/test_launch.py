"""The direct launch of compiled kernels (kernels/_tuner.py): once Triton
has compiled a kernel for a launch's specialization, later launches find it
through Triton's own binder and cache key and skip JITFunction.run; a new
specialization (a pointer's alignment), a pre-run hook or a lookup that
disagrees with Triton goes through JITFunction.run. Checked with the kernels
compiled for sm_90 and a stand-in driver (tests/launch_probe.py)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def facts():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FUSED_SIGXENT_BACKEND")}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, os.path.join(ROOT, "tests"), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "launch_probe.py")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    return json.loads(run.stdout)


def test_compiled_kernels_launch_directly(facts):
    # (direct launches, JITFunction.run launches) of a fwd+bwd: forward, scale.
    # The first call's tuning compiled both, so even it launches directly.
    assert facts["first_call"] == [2, 0]
    assert facts["second_call"] == [2, 0]
    assert facts["direct_enabled"] == [True, True]


def test_a_new_alignment_gets_its_own_kernel(facts):
    assert facts["shifted_first_call"] == [1, 1]  # the forward compiles anew; scale is unchanged
    assert facts["shifted_second_call"] == [2, 0]
    assert facts["shifted_kernel_differs"]


def test_a_pre_run_hook_sends_launches_through_triton(facts):
    assert facts["with_hook"] == [1, 1]


def test_a_lookup_that_disagrees_with_triton_turns_the_direct_route_off(facts):
    assert facts["after_disagreement"] == [True, False]
    assert facts["after_disagreement_call"] == [1, 1]
