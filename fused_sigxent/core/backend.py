"""Which implementation runs: FUSED_SIGXENT_BACKEND, read at every call."""

import functools
import os

import torch

BACKENDS = ("auto", "triton", "reference")
ENV = "FUSED_SIGXENT_BACKEND"


def backend() -> str:
    """The chosen backend name; ValueError for anything but `BACKENDS`."""
    if torch.compiler.is_compiling():
        # Dynamo traces through a cache wrapper, with a warning: it folds the parse into the graph anyway.
        return _parse(os.environ.get(ENV, "auto"))
    environ = os.environ
    if environ is _ENVIRON and _ENCODED is not None:
        return _parse_encoded(_ENCODED.get(_ENCODED_NAME))
    return _parse_once(environ.get(ENV, "auto"))


# os.environ.get encodes the name and decodes the value in Python on every
# call, and the backend is read several times per loss call. CPython's
# os.environ keeps its entries, encoded, in a dict that every update of
# os.environ (monkeypatch.setenv included) writes through: read there, the
# same answer costs a dictionary lookup. Where os.environ is not that
# object any more (replaced by a test's mock) or has no such dict, os.environ.get.
_ENVIRON = os.environ
_ENCODED = getattr(_ENVIRON, "_data", None)
_ENCODED_NAME = _ENVIRON.encodekey(ENV) if _ENCODED is not None else None


def _parse(value: str) -> str:
    name = value.strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"{ENV}={value!r} is not one of {', '.join(BACKENDS)}")
    return name


# Read several times per call: parsed once per distinct value.
_parse_once = functools.lru_cache(maxsize=16)(_parse)


@functools.lru_cache(maxsize=16)
def _parse_encoded(value: bytes | None) -> str:
    return _parse("auto" if value is None else os.environ.decodevalue(value))


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


def on_device(device: torch.device) -> torch.cuda.device | None:
    """The context a launch must run in, or None where it runs as it is:
    Triton launches on the *current* CUDA device and stream, so a cuda:1
    tensor while cuda:0 is current would be read from the wrong device (or
    race). None for CPU tensors and for the device that is current already
    (entering even an empty context costs host time on every call)."""
    if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
        return None
    return torch.cuda.device(device)
