"""Data parallelism over torch.distributed: rank and world size, sharding, gradient all-reduce, barriers.

Every function here is a no-op (or the identity) when no process group is initialised, so one process runs
exactly the code it always ran.

How ``torchrun --nproc_per_node w -m clsuite.cli run ...`` trains:

* ``init_from_env`` joins the group torchrun (or ``accelerate launch``) describes in the environment: backend
  nccl with one GPU per rank (``LOCAL_RANK``) when CUDA is available, gloo on the CPU otherwise.
* Every rank builds the same model, data and plugins from the same seed, and rank 0's weights are broadcast at
  the start of each experience (as DDP does when it wraps a model; a parametrization may just have added
  weights). The engine's batch generator and the data plugins (replay) run identically on every rank, so each
  rank holds the same *global* batch and trains on its strided shard ``batch[rank::w]``.
* After the closure's backward passes the engine calls ``average_gradients``: ``.grad`` becomes the mean over
  ranks. ``clsuite.data.lm_loss`` is a per-example mean and every rank's shard has ``batch_size / w`` examples
  in ``grad_accum`` equal micro-batches (``check_batch``), so the result is the gradient one process computes
  on the whole global batch, loss plugins' terms included.
* Evaluation, sharpness and the record are rank 0's; the other ranks wait at a barrier.

Why an explicit all-reduce in the engine's closure rather than ``DistributedDataParallel``:

* SAM needs, after *each* of its two closure calls, the gradient averaged over all ranks (its global norm sets
  the perturbation). The closure ends with one all-reduce of every ``.grad``, so both passes see the global
  gradient, and any update rule that calls the closure gets it without knowing about ranks. DDP all-reduces
  inside every ``backward()``; with gradient accumulation that needs ``no_sync()`` on all but the last
  micro-batch, and EWC's per-example ``torch.autograd.grad`` calls through the model would each need
  ``no_sync()`` (or the unwrapped module) so that nothing is reduced per example.
* DDP wraps the model: parameter names gain a ``module.`` prefix (EWC matches its Fisher by name, Wise-FT and
  LoRA read state dicts) and ``generate``/``save_pretrained`` must be reached through ``.module``. Without
  the wrapper ``ctx.model`` stays the Hugging Face model on every rank.
* The cost: DDP overlaps its bucketed all-reduce with the backward pass; here the all-reduce follows the
  backward passes (one per closure call, not per micro-batch), so communication is not hidden behind compute.

The all-reduce runs on flat float32 (float64 kept) buffers of at most ``_BUCKET`` elements, so half-precision
gradients are summed in float32 and the extra memory is bounded. Sums over ranks are identical on every rank
(each element is reduced once, then shared), so the ranks' weights stay bit-identical after every step.
"""
from __future__ import annotations

import atexit
import os
from contextlib import contextmanager
from datetime import timedelta
from typing import Callable, Iterator, Sequence, TypeVar

import torch
import torch.distributed as dist

from .errors import UserError

T = TypeVar("T")
_BUCKET = 1 << 25  # elements per collective: bounds the flat copy to 128 MiB in float32
# Ranks other than 0 wait at a barrier while rank 0 evaluates; the default timeout (10 min on nccl) is too short.
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
        return torch.promote_types(dtype, torch.float32)
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
    """Give every rank rank 0's parameters and buffers."""
    broadcast_(list(model.parameters()) + list(model.buffers()))


def average_gradients(params: list[torch.nn.Parameter], loss: torch.Tensor) -> torch.Tensor:
    """Average ``.grad`` of ``params`` over ranks in place; returns ``loss`` averaged over ranks.

    A parameter with a gradient on some rank but not this one gets a zero gradient first, so every rank reduces
    the same tensors; one without a gradient on any rank keeps ``None``, as it would in one process."""
    if not is_distributed():
        return loss
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


def barrier() -> None:
    """Wait until every rank gets here."""
    if is_distributed():
        dist.barrier()


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. building a cached model), the other ranks after it."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()
