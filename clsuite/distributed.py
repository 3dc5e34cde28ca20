"""Data parallelism over torch.distributed: rank and world size, sharding, gradient all-reduce, status exchanges;
every function is the identity without a process group (docs/distributed.md, docs/faults.md). FSDP's own parts
are in ``clsuite.sharding``."""
from __future__ import annotations

import atexit
import json
import os
import sys
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist

from .errors import DivergenceError, UserError
from .numerics import at_least_float32

T = TypeVar("T")
_BUCKET = 1 << 25  # elements per collective: bounds the flat copy to 128 MiB in float32
# Ranks other than 0 wait in ``agree`` while rank 0 evaluates; the default timeout (10 min on nccl) is too short.
_TIMEOUT = timedelta(hours=2)


def is_distributed() -> bool:
    """Whether a process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 when not distributed)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """The number of processes (1 when not distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Whether this process evaluates and writes records (rank 0)."""
    return rank() == 0


def init_from_env() -> bool:
    """Join the process group described by torchrun's environment when WORLD_SIZE > 1; True if distributed."""
    if is_distributed():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=_TIMEOUT)
    atexit.register(_destroy)
    return True


def _destroy() -> None:
    if is_distributed():
        dist.destroy_process_group()


def device() -> torch.device:
    """The device this rank trains on: its GPU under nccl, the CPU under gloo; one process takes the GPU when
    there is one, unless ``CLSUITE_DEVICE`` names another (e.g. ``CLSUITE_DEVICE=cpu``)."""
    if is_distributed():
        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    if os.environ.get("CLSUITE_DEVICE"):
        return torch.device(os.environ["CLSUITE_DEVICE"])
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def is_sharded(t: torch.Tensor) -> bool:
    """Whether ``t`` is one process's shard of a larger tensor (a DTensor of FSDP), not a whole replicated tensor."""
    tensor = sys.modules.get("torch.distributed.tensor")  # not imported: no DTensor exists (its import is spared)
    return tensor is not None and isinstance(t, tensor.DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of ``t``: the local shard of a DTensor (a view: in-place changes reach the parameter),
    ``t`` itself otherwise."""
    return t.to_local() if is_sharded(t) else t


def shard(items: Sequence[T]) -> list[T]:
    """This rank's strided share ``items[rank::world_size]`` (all of ``items`` when not distributed)."""
    return list(items[rank()::world_size()])


def check_batch(batch_size: int, grad_accum: int, rows: int | None = None) -> None:
    """A UserError unless every rank gets ``grad_accum`` equal, non-empty micro-batches of every global batch
    (``rows``: the experience's training rows, when known)."""
    w = world_size()
    if w == 1:
        return
    unit = w * grad_accum
    if batch_size % unit:
        raise UserError(f"batch_size {batch_size} is not a multiple of world size {w} × grad_accum {grad_accum} "
                        f"= {unit}: each rank needs equal micro-batches; use e.g. --set batch_size="
                        f"{max(unit, batch_size // unit * unit)}")
    if rows is not None and rows < batch_size:
        raise UserError(f"the experience has {rows} training rows, fewer than batch_size {batch_size}: with "
                        f"{w} processes every global batch must be full; lower batch_size")


def _wide(dtype: torch.dtype) -> torch.dtype:
    """The dtype a tensor travels in: float32 for half precision (summed without overflow), uint8 for bool."""
    if dtype.is_floating_point:
        return at_least_float32(dtype)
    return torch.uint8 if dtype == torch.bool else dtype


@torch.no_grad()
def _coalesced(tensors: list[torch.Tensor], op: Callable[[torch.Tensor], None]) -> None:
    """Apply the collective ``op`` to flat buffers of ``tensors`` (by travel dtype, ``_BUCKET`` elements at most)
    and copy the results back in place. Every rank must pass tensors of the same shapes and dtypes, in order."""
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault(_wide(t.dtype), []).append(t)
    dev = device()
    for dtype, group in groups.items():
        start = 0
        while start < len(group):
            end, n = start + 1, group[start].numel()
            while end < len(group) and n + group[end].numel() <= _BUCKET:
                n += group[end].numel()
                end += 1
            chunk = group[start:end]
            flat = torch.cat([t.reshape(-1).to(dev, dtype) for t in chunk])
            op(flat)
            offset = 0
            for t in chunk:
                t.copy_(flat[offset:offset + t.numel()].view(t.shape))
                offset += t.numel()
            start = end


def all_reduce_sum_(tensors: list[torch.Tensor]) -> None:
    """Replace each tensor by its sum over ranks, in place (same on every rank)."""
    if is_distributed():
        _coalesced(tensors, dist.all_reduce)


def total(x: int) -> int:
    """The sum of an integer over ranks."""
    t = torch.tensor(float(x), dtype=torch.float64)
    all_reduce_sum_([t])
    return int(t)


def broadcast_(tensors: list[torch.Tensor]) -> None:
    """Overwrite each tensor with rank 0's, in place."""
    if is_distributed():
        _coalesced(tensors, lambda flat: dist.broadcast(flat, src=0))


def broadcast_model(model: torch.nn.Module) -> None:
    """Give every rank rank 0's parameters and buffers (the whole ones: a shard of FSDP is each rank's own)."""
    broadcast_([t for t in list(model.parameters()) + list(model.buffers()) if not is_sharded(t)])


def broadcast_json(value: Any) -> Any:
    """Rank 0's ``value`` (JSON-serialisable) on every rank, sent as UTF-8 JSON bytes (never pickled)."""
    if not is_distributed():
        return value
    data = json.dumps(value).encode() if is_main() else b""
    size = torch.tensor([len(data)], dtype=torch.int64)
    broadcast_([size])
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(int(size), dtype=torch.uint8)
    broadcast_([buf])
    return json.loads(bytes(buf.numpy()).decode())


def average_gradients(params: list[torch.nn.Parameter], loss: torch.Tensor) -> torch.Tensor:
    """Average ``.grad`` of ``params`` over ranks in place; returns ``loss`` averaged over ranks. Sharded parameters
    are left alone: FSDP's backward has already reduce-scattered their gradients, averaged.

    A parameter with a gradient on some rank but not this one gets a zero gradient first, so every rank reduces
    the same tensors; one without a gradient on any rank keeps ``None``, as it would in one process."""
    if not is_distributed():
        return loss
    params = [p for p in params if not is_sharded(p)]
    w = world_size()
    have = torch.tensor([float(p.grad is not None) for p in params])
    all_reduce_sum_([have])
    for p, h in zip(params, have.tolist()):
        if h and p.grad is None:
            p.grad = torch.zeros_like(p)
    loss = loss.detach().clone()

    def mean(flat: torch.Tensor) -> None:
        dist.all_reduce(flat)
        flat.div_(w)

    _coalesced([p.grad for p in params if p.grad is not None] + [loss], mean)
    return loss


class RankFailed(RuntimeError):
    """An exception on another rank (not a DivergenceError or UserError), passed on by ``agree``."""


_PASSED_ON = (DivergenceError, UserError)  # raised as themselves on the other ranks; others become RankFailed
_MESSAGE_BYTES = 2048


def agree(error: BaseException | None = None) -> None:
    """Meet every other rank and learn whether one failed (``error``: this rank's exception, if any): a rank that
    did not fail raises the lowest failing rank's error, with its message; a failing rank returns and re-raises its
    own. One all-reduce of a small byte tensor; a no-op in one process."""
    if not is_distributed():
        return
    status = torch.zeros(world_size(), 1 + _MESSAGE_BYTES, dtype=torch.uint8)
    if error is not None:
        kind = next((i for i, k in enumerate(_PASSED_ON, 1) if isinstance(error, k)), len(_PASSED_ON) + 1)
        text = str(error) if kind <= len(_PASSED_ON) else f"{type(error).__name__}: {error}"
        data = text.encode()[:_MESSAGE_BYTES]
        status[rank(), 0] = kind
        status[rank(), 1:1 + len(data)] = torch.tensor(list(data), dtype=torch.uint8)
    status = status.to(device())
    dist.all_reduce(status)  # each row is written by one rank only: the sum is every rank's status
    failed = status[:, 0].nonzero().flatten().tolist()
    if not failed or error is not None:
        return
    row = status[failed[0]].cpu()
    text = bytes(row[1:].tolist()).rstrip(b"\0").decode(errors="replace")
    kind = int(row[0])
    if kind <= len(_PASSED_ON):
        raise _PASSED_ON[kind - 1](text)
    raise RankFailed(f"rank {failed[0]} failed: {text}")


def on_main(fn: Callable[[], T]) -> T | None:
    """Run ``fn`` on rank 0 alone (evaluation, writing) while the others wait; an exception there is raised on
    every rank at once (``agree``). Returns ``fn``'s result on rank 0, None elsewhere."""
    return _then_agree(fn if is_main() else lambda: None)


def everywhere(fn: Callable[[], T]) -> T:
    """Run ``fn`` on every rank (e.g. evaluating a sharded model, whose forward passes need them all); an exception
    on any rank is raised on every rank (``agree``)."""
    return _then_agree(fn)


def _then_agree(fn: Callable[[], T]) -> T:
    """``fn()``, then ``agree`` on whether it failed on any rank (this rank's own exception re-raised)."""
    result, error = None, None
    try:
        result = fn()
    except Exception as e:
        error = e
    agree(error)
    if error is not None:
        raise error
    return result


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. building a cached model), the other ranks after it; a failure on any rank
    is raised on every rank (``agree``)."""
    if not is_distributed():
        yield
        return
    if not is_main():
        agree()  # rank 0's block has run (its error is raised here)
    try:
        yield
    except Exception as e:
        agree(e)
        raise
    if is_main():
        agree()  # the meeting the others hold before their block
    agree()  # every other rank's block has run
