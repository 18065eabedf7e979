"""The README's examples run (on the CPU, with their CUDA device swapped for it)."""

import os
import re

import pytest

README = os.path.join(os.path.dirname(__file__), "..", "README.md")
BLOCKS = re.findall(r"```python\n(.*?)```", open(README).read(), re.S)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(monkeypatch, index):
    # The API, not the kernels (tested elsewhere): the examples' 4M elements
    # would take minutes under the interpreter.
    monkeypatch.setenv("FUSED_SIGXENT_BACKEND", "reference")
    assert len(BLOCKS) >= 2  # one example per front end
    exec(compile(BLOCKS[index].replace('device="cuda"', 'device="cpu"'), f"README block {index}", "exec"), {})
