"""`python -m perf.cpu_loop_build`: first-use build and cached load of the CPU
loop (fused_sigxent/impl/csrc/sigmoid_ce_cpu.cpp) by the package's own build
(the compiler called once, the library renamed into place, loaded with ctypes)
and by `torch.utils.cpp_extension.load`, each in fresh processes with an empty
cache; one tidy CSV row per (builder, call) (what docs/design.md cites for
keeping the build by hand)."""

import argparse
import datetime
import json
import subprocess
import sys
import tempfile

import pandas as pd
import torch

from . import _bench
from .host_overhead import COLUMNS

# Run in a fresh process each: the first call builds, later ones load the cache.
_CHILD = r"""
import ctypes, os, sys, time
import torch
from fused_sigxent.impl import cpu_loop
which, cache = sys.argv[1], sys.argv[2]
start = time.perf_counter()
if which == "package":
    os.environ[cpu_loop.CACHE_ENV] = cache
    assert cpu_loop.library() is not None
else:
    from torch.utils import cpp_extension
    flags = cpu_loop._CAPABILITY_FLAGS.get(torch.backends.cpu.get_cpu_capability(), [])
    cpp_extension.load(name="fused_sigxent_cpu_loop", sources=[cpu_loop.SOURCE],
                       extra_cflags=["-O3", "-fopenmp", *flags], extra_ldflags=["-fopenmp"], build_directory=cache,
                       is_python_module=False)
    lib = ctypes.CDLL(os.path.join(cache, "fused_sigxent_cpu_loop.so"))
    assert lib.fused_sigxent_cpu_loop_args_size() == ctypes.sizeof(cpu_loop.Args)
print(time.perf_counter() - start)
"""
CALLS = ("first build", "cached load", "cached load")


def seconds(builder: str, cache: str) -> float:
    done = subprocess.run([sys.executable, "-c", _CHILD, builder, cache], capture_output=True, text=True, timeout=600)
    if done.returncode:
        raise RuntimeError(f"{builder}: {done.stderr.strip()[-2000:]}")
    return float(done.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    env = _bench.environment(torch.device("cpu"))
    rows = []
    for builder in ("package", "cpp_extension"):
        with tempfile.TemporaryDirectory() as cache:
            for call in CALLS:
                s = seconds(builder, cache)
                rows.append(dict(op="cpu_loop/build", provider=builder, mode=call, dtype="", n_rows=0, n_cols=0,
                                 metric="wall_time", unit="s", p50=s, p20=s, p80=s, device_name=env["device"],
                                 timestamp=datetime.datetime.now().isoformat(timespec="seconds"),
                                 package_version=f"torch {env['torch_version']}",
                                 config=json.dumps({"commit": env["commit"]})))
                print(f"{builder:14s} {call:12s} {s:8.3f} s", flush=True)
    frame = pd.DataFrame(rows, columns=COLUMNS)
    _bench.save_csv(frame, "cpu_loop_build-", torch.device("cpu"), args.out)
    return frame


if __name__ == "__main__":
    main()
