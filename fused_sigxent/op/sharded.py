"""Losses of DTensor arguments on a 1-D device mesh, shard by shard, and the
class-parallel fused linear head (`class_parallel`). For the losses: each
rank runs the fused loss on its local shard (its own route, a call plan in
eager code), and a reduced loss all-reduces two scalars per rank (its sum
and, for TensorFlow's weight means, its denominator) into a replicated
DTensor. Autograd goes through DTensor's own `to_local` / `from_local`, so
every gradient comes back as a DTensor placed as its input.

Layouts: logits and labels `Shard(d)` (any d, even or uneven splits) or
`Replicate()`, alike; weight and pos_weight replicated (a plain tensor
counts as replicated) or sharded along the logits' dimension they broadcast
to; class-index targets of the focal loss replicated or sharded like the
logits' leading dimensions. Anything else (a mesh of more dimensions, a
`Partial` input, mismatched meshes or placements) raises, naming it."""

import math

import torch
from torch import Tensor

from ..core import reduction as R
from ..core.dtypes import compute_dtype
from ..impl import chunked as _chunked
from ..impl import class_parallel as _class_parallel
from ..impl import reference
from .derivatives import ClassParallelHead

try:
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
except ImportError:  # a torch built without distributed support
    DTensor = None


def _placement(t) -> str:
    return ", ".join(str(p) for p in t.placements)


def _unsupported(message: str) -> NotImplementedError:
    return NotImplementedError(f"fused_sigxent's sharded losses: {message}")


def shard_dim(x) -> int | None:
    """The logits' sharded dimension (non-negative), or None where replicated;
    NotImplementedError for any other layout."""
    mesh = x.device_mesh
    if mesh.ndim != 1:
        raise _unsupported(f"a {mesh.ndim}-D device mesh ({_placement(x)}); only 1-D meshes are supported")
    placement = x.placements[0]
    if isinstance(placement, Replicate):
        return None
    if isinstance(placement, Shard):
        return placement.dim % x.dim()
    raise _unsupported(f"logits placed {placement}: pass Shard(d) or Replicate() logits (a Partial tensor is a "
                       "sum still to reduce: redistribute it first)")


def _same_mesh(name: str, t, x) -> None:
    if t.device_mesh != x.device_mesh:
        raise _unsupported(f"{name} is on mesh {t.device_mesh}, the logits (or weight) on {x.device_mesh}")


def _shard_range(size: int, mesh) -> tuple[int, int]:
    """(offset, length) of this rank's shard of a dimension of `size`, as
    DTensor's Shard splits it (torch.chunk: ceil(size / W) per rank, the
    last ones shorter or empty)."""
    world, rank = mesh.size(), mesh.get_local_rank()
    chunk = -(-size // world)
    offset = min(rank * chunk, size)
    return offset, max(0, min(chunk, size - offset))


def _local_labels(z, x, d: int | None) -> Tensor:
    """The labels' local shard, placed as the logits (class indices: as the
    logits' leading dimensions; with class-sharded logits, replicated and
    read as this shard's ids)."""
    if not isinstance(z, DTensor):
        if d is not None:
            raise _unsupported("DTensor logits sharded with plain-tensor labels: shard the labels alike")
        return z
    _same_mesh("labels", z, x)
    if z.dtype == torch.int64 and z.dim() == x.dim() - 1:
        return _local_class_indices(z, x, d)
    if z.placements != x.placements:
        raise _unsupported(f"labels placed {_placement(z)} but logits {_placement(x)}: place them alike")
    return z.to_local()


def _local_class_indices(z, x, d: int | None) -> Tensor:
    """Class-index targets' local shard: sharded like a leading dimension of
    the logits, or, for class-sharded logits, replicated and mapped to this
    shard's classes (another shard's class, -1 and C: no positive here; an id
    outside [-1, C] stays out of range, so its row's loss is NaN)."""
    classes = x.shape[-1]
    if d == x.dim() - 1:
        if not isinstance(z.placements[0], Replicate):
            raise _unsupported(f"class-index targets placed {_placement(z)} with class-sharded logits: replicate them")
        ids = z.to_local()
        offset, length = _shard_range(classes, x.device_mesh)
        here = (ids >= offset) & (ids < offset + length)
        valid = (ids >= -1) & (ids <= classes)
        return torch.where(here, ids - offset, torch.where(valid, -1, -2))
    want = x.placements if d is not None else [Replicate()]
    if list(z.placements) != list(want):
        raise _unsupported(f"class-index targets placed {_placement(z)} but logits {_placement(x)}: place them "
                           "like the logits' leading dimensions")
    return z.to_local()


def _local_coefficient(name: str, c, x, d: int | None):
    """A weight or pos_weight's local part for this rank's logits shard.
    Replicated (or a plain tensor, taken as replicated) coefficients are
    sliced, as views, to the shard where they vary along the sharded
    dimension, their gradient a partial sum; a sharded one must be sharded
    along that same dimension."""
    if c is None:
        return None
    if not isinstance(c, DTensor):
        if d is None:
            return c
        # Replicated on every rank: a DTensor of it, whose gradient DTensor reduces.
        c = DTensor.from_local(c, x.device_mesh, [Replicate()], run_check=False)
    _same_mesh(name, c, x)
    aligned = None if d is None else d - (x.dim() - c.dim())
    placement = c.placements[0]
    if isinstance(placement, Shard):
        if d is None or placement.dim % c.dim() != aligned or c.shape[aligned] != x.shape[d]:
            raise _unsupported(f"{name} placed {_placement(c)} for logits {_placement(x)} of shape {tuple(x.shape)}: "
                               f"shard it along the logits' sharded dimension, or replicate it")
        return c.to_local()
    if not isinstance(placement, Replicate):
        raise _unsupported(f"{name} placed {placement}: replicate it or shard it like the logits")
    if d is None:
        return c.to_local()
    local = c.to_local(grad_placements=[Partial()])
    if aligned is None or aligned < 0 or c.shape[aligned] == 1:
        return local
    offset, length = _shard_range(x.shape[d], x.device_mesh)
    return local.narrow(aligned, offset, length)


def loss(args: tuple, local_loss) -> Tensor:
    """The loss of checked op arguments whose logits are a DTensor, shard by
    shard (`local_loss(args)`: the loss of plain-tensor op arguments)."""
    x, z, w, p, label_smoothing, reduction, out_dtype = args[:7]
    focal = args[7:]
    if not isinstance(x, DTensor):
        placed = next((f"{name} placed {_placement(t)}" for name, t in (("labels", z), ("weight", w),
                       ("pos_weight", p)) if isinstance(t, DTensor)), "DTensor arguments")
        raise _unsupported(f"plain-tensor logits with {placed}: make the logits a DTensor too "
                           "(distribute_tensor or DTensor.from_local)")
    d = shard_dim(x)
    xl = x.to_local()
    zl = _local_labels(z, x, d)
    wl, pl = _local_coefficient("weight", w, x, d), _local_coefficient("pos_weight", p, x, d)
    mesh = x.device_mesh
    if reduction == R.NONE:
        local = local_loss((xl, zl, wl, pl, label_smoothing, R.NONE, out_dtype, *focal))
        return DTensor.from_local(local, mesh, x.placements, run_check=False, shape=x.shape, stride=x.stride())
    ct = compute_dtype(xl.dtype)
    total = local_loss((xl, zl, wl, pl, label_smoothing, R.SUM, ct, *focal))
    if reduction in (R.MEAN_BY_WEIGHTS, R.MEAN_BY_NONZERO) and wl is not None:
        # TF's weight means: this shard's part of the denominator, from the
        # weight alone (a broadcast weight counts each of its copies).
        part, whole = reference.denominator(reduction, wl, xl, ct), 0.0
    else:  # a denominator of the global shape alone: nothing to reduce
        part, whole = torch.zeros((), dtype=ct, device=xl.device), _shape_denominator(reduction, x.shape)
    sums = torch.stack([total, part])
    # One all-reduce of the two scalars (none where every rank holds the whole).
    placement = Replicate() if d is None else Partial()
    sums = DTensor.from_local(sums, mesh, [placement], run_check=False).redistribute(mesh, [Replicate()])
    return reference.divide(sums[0], sums[1] + whole, reduction).to(out_dtype)


def _shape_denominator(reduction: int, shape) -> float:
    """The denominator that depends on the global shape alone."""
    if reduction in (R.MEAN_BY_NUMEL, R.TORCH_MEAN, R.MEAN_BY_WEIGHTS, R.MEAN_BY_NONZERO):
        return float(math.prod(shape))
    return 1.0


def _shard0(name: str, t, mesh) -> Tensor | None:
    """A bias or pos_weight of the class-parallel head: None, Shard(0) like
    the weight, or (one number) replicated; its local part."""
    if t is None:
        return None
    if not isinstance(t, DTensor):
        raise _unsupported(f"{name} is a plain tensor but the weight is a DTensor: place it Shard(0), as the weight")
    _same_mesh(name, t, mesh)
    if isinstance(t.placements[0], Shard) and t.placements[0].dim % max(t.dim(), 1) == 0 and t.dim() == 1 \
            and t.shape[0] > 1:
        return t.to_local()
    if isinstance(t.placements[0], Replicate) and t.numel() == 1:
        return t.to_local(grad_placements=[Partial()])
    raise _unsupported(f"{name} placed {_placement(t)} with a class-parallel weight: place it Shard(0), as the weight")


def _class_ids(ids: Tensor, offset: int, length: int, n_classes: int) -> Tensor:
    """Global class ids as this rank's block's: another block's class, -1 and
    C mean no positive here (-1). Checked first: an id outside [-1, C] raises
    (CPU) or stops the run (CUDA, a device-side assertion, no host sync)."""
    bad = (ids < -1) | (ids > n_classes)
    if ids.device.type == "cpu" and not torch.compiler.is_compiling():
        if ids.numel() and bad.any():
            raise ValueError(f"target holds class indices outside [-1, {n_classes}] (C = weight.shape[0] = "
                             f"{n_classes}; -1 and C mean no positive); got values from {int(ids.min())} to "
                             f"{int(ids.max())}")
    else:
        torch._assert_async(~bad.any(), f"target holds class indices outside [-1, {n_classes}]")
    here = (ids >= offset) & (ids < offset + length)
    return torch.where(here, ids - offset, -1)


def class_parallel(x, weight, bias, dense, positives, pos_weight, smoothing: Tensor, reduction: int,
                   chunk_size: int):
    """The fused linear loss with a class-parallel weight (a DTensor placed
    Shard(0) on a 1-D mesh; bias and pos_weight alike) and the input
    replicated (a tensor-parallel trunk; a plain tensor counts as replicated)
    or Shard(0) (a data-parallel trunk: each rank its own rows, gathered for
    the head). Sparse positives carry global ids placed like the input's
    rows; dense targets are Shard(1) with a replicated input. A replicated
    DTensor loss; every gradient placed as its input."""
    mesh = weight.device_mesh
    if mesh.ndim != 1:
        raise _unsupported(f"a {mesh.ndim}-D device mesh for the weight ({_placement(weight)}); only 1-D meshes")
    if not (isinstance(weight.placements[0], Shard) and weight.placements[0].dim % 2 == 0):
        raise _unsupported(f"weight placed {_placement(weight)}: the class-parallel head takes Shard(0) (each rank "
                           "a block of classes); replicate nothing: the weight is never gathered")
    n_classes = weight.shape[0]
    offset, length = _shard_range(n_classes, mesh)
    rows_sharded = False
    if isinstance(x, DTensor):
        _same_mesh("input", x, weight)
        if isinstance(x.placements[0], Shard) and x.placements[0].dim % x.dim() == 0:
            rows_sharded = True
        elif not isinstance(x.placements[0], Replicate):
            raise _unsupported(f"input placed {_placement(x)}: Replicate() (a tensor-parallel trunk) or Shard(0) "
                               "(a data-parallel trunk)")
        x_local = x.to_local()
    else:
        x_local = x
    dense_local = positives_local = None
    if dense is not None:
        if rows_sharded:
            raise _unsupported(f"dense targets with an input placed {_placement(x)}: dense (B, C) targets take a "
                               "replicated input (each rank all of B, its own classes' columns); with a Shard(0) "
                               "input pass sparse positives")
        if not isinstance(dense, DTensor) or not isinstance(dense.placements[0], Shard) \
                or dense.placements[0].dim % 2 != 1:
            raise _unsupported("dense targets with a class-parallel weight must be a DTensor placed Shard(1) (each "
                               "rank its classes' columns), with a replicated input; got "
                               f"{_placement(dense) if isinstance(dense, DTensor) else 'a plain tensor'}")
        _same_mesh("target", dense, weight)
        dense_local = dense.to_local()
    else:
        want = Shard(0) if rows_sharded else Replicate()
        if isinstance(positives, DTensor):
            _same_mesh("target", positives, weight)
            if positives.placements[0] != want:
                raise _unsupported(f"positive class ids placed {_placement(positives)} for an input placed "
                                   f"{want}: place them like the input's rows")
            positives = positives.to_local()
        elif rows_sharded:
            raise _unsupported("positive class ids as a plain tensor with a Shard(0) input: place them Shard(0)")
        if rows_sharded:  # every rank's rows meet this rank's classes: their ids, gathered
            positives, _ = _class_parallel.gather_rows(positives, mesh.get_group())
        positives_local = _class_ids(positives, offset, length, n_classes)
    if chunk_size == 0:
        # Rows per chunk as one device holding every class would take them:
        # each rank's chunk of logits is then 1 / W of that device's.
        chunk_size = _chunked.chunk_rows(_chunked.MAX_ROWS, n_classes, x_local.device)
    loss = ClassParallelHead.apply(
        x_local, weight.to_local(), _shard0("bias", bias, weight), _shard0("pos_weight", pos_weight, weight),
        dense_local, positives_local, smoothing, reduction == R.TORCH_MEAN, n_classes, chunk_size, rows_sharded,
        mesh.get_group())
    return DTensor.from_local(loss, mesh, [Replicate()], run_check=False)
