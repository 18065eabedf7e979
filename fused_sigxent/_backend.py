"""Which implementation runs: FUSED_SIGXENT_BACKEND, read at every call."""

import contextlib
import functools
import os

import torch

BACKENDS = ("auto", "triton", "reference")
ENV = "FUSED_SIGXENT_BACKEND"


def backend() -> str:
    """The chosen backend name; ValueError for anything but `BACKENDS`."""
    value = os.environ.get(ENV, "auto")
    # Dynamo traces through a cache wrapper, with a warning: it folds the parse into the graph anyway.
    return _parse(value) if torch.compiler.is_compiling() else _parse_once(value)


def _parse(value: str) -> str:
    name = value.strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"{ENV}={value!r} is not one of {', '.join(BACKENDS)}")
    return name


# Read several times per call: parsed once per distinct value.
_parse_once = functools.lru_cache(maxsize=16)(_parse)


def interpreting() -> bool:
    """Triton runs kernels on the CPU, slowly, only under TRITON_INTERPRET=1."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def check(device: torch.device) -> None:
    """Raises before any computation when the backend cannot run on `device`."""
    if backend() == "triton" and device.type != "cuda" and not interpreting():
        raise ValueError(
            f"{ENV}=triton got {device.type} tensors: Triton kernels need CUDA tensors, "
            "or TRITON_INTERPRET=1 (set before the first call) to interpret them on the CPU"
        )


def use_kernels(device: torch.device) -> bool:
    """True where the Triton kernels run, False where the reference path does."""
    name = backend()
    if name == "reference":
        return False
    if name == "auto":
        return device.type == "cuda"
    check(device)
    return True


def on_device(device: torch.device):
    """The context a launch runs in: Triton launches on the *current* CUDA
    device and stream, so a cuda:1 tensor while cuda:0 is current would be
    read from the wrong device (or race). A no-op for CPU tensors."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
