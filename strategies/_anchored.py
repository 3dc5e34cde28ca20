"""What the anchored loss strategies (ewc, mas, si, l2sp) share: importance estimates, the quadratic penalty towards
stored weights, and their bookkeeping (docs/strategies.md)."""
from __future__ import annotations

import random
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch

from clsuite import distributed, sharding
from clsuite.errors import DivergenceError
from clsuite.numerics import at_least_float32
from clsuite.strategy import Conflict

FRESH_ADAPTER = ("each task trains a fresh adapter that starts at zero, so no stored anchor refers to its weights and "
                 "the penalty would do nothing; use lora (mode=continue)")


def lora_merge_conflict(reason: str = FRESH_ADAPTER) -> Conflict:
    """The refusal of lora (mode=merge), whose per-task adapters have no stored anchor."""
    return Conflict("lora", when={"mode": "merge"}, reason=reason)


def trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """Parameter name -> parameter, for those that require a gradient."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every trainable parameter: an anchor θ*."""
    return {n: p.detach().clone() for n, p in trainable(model).items()}


def seeded_sample(key: str, n: int, k: int) -> list[int]:
    """``min(k, n)`` distinct indices of ``range(n)``, in the order a ``random.Random(key)`` draws them."""
    return random.Random(key).sample(range(n), min(k, n))


def finished_task_rows(ctx: Any, pick: Callable[[int, int, int], list[int]]) -> list[dict] | None:
    """The finished task's training rows ``pick(n, seed, experience)`` chooses; None without training rows or after
    the last experience (no later task would be penalised)."""
    data = ctx.task.train if ctx.task is not None else None
    last = ctx.stream is not None and ctx.experience == len(ctx.stream.tasks) - 1
    if data is None or len(data) == 0 or last:
        return None
    return [data[i] for i in pick(len(data), ctx.config.seed, ctx.experience)]


def per_example_importance(ctx: Any, rows: list[dict], objective: Callable[[dict], torch.Tensor],
                           reduce: Callable[[torch.Tensor], torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """Mean over ``rows`` of ``reduce(g)``, g each example's gradient of ``objective(row)``, per trainable parameter
    (float32 at least, model in eval mode). Each rank takes a strided share of ``rows`` and the sums are all-reduced,
    so every rank holds the same result; a non-finite objective on any rank raises ``non-finite {what} on task``."""
    params = trainable(ctx.model)
    names, tensors = list(params), list(params.values())
    acc = {n: torch.zeros_like(p, dtype=at_least_float32(p.dtype)) for n, p in params.items()}
    was_training = ctx.model.training
    ctx.model.eval()  # no dropout noise in the per-example gradients
    bad = torch.zeros(())  # non-finite objectives met; summed over ranks with the estimate, so all ranks raise
    try:
        for row in distributed.shard(rows):
            out = objective(row)
            if not torch.isfinite(out):
                bad += 1
                break
            for n, g in zip(names, torch.autograd.grad(out, tensors, allow_unused=True)):
                if g is not None:
                    acc[n].add_(reduce(g.detach().to(acc[n].dtype)))
    finally:
        ctx.model.train(was_training)
    distributed.all_reduce_sum_(list(acc.values()) + [bad])
    if bad:
        raise DivergenceError(f"non-finite {what} on task {getattr(ctx.task, 'name', '?')!r}")
    ctx.example_passes += len(rows)
    return {n: a.div_(max(1, len(rows))) for n, a in acc.items()}


def quadratic_sum(model: torch.nn.Module,
                  stored: Iterable[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]) -> torch.Tensor | None:
    """Σ over ``(weights, anchor)`` pairs of Σ_i w_i (θ_i − θ*_i)², over the trainable parameters with a weight of
    their shape and an anchor (float32 at least); None if no name matches. Under FSDP each process sums its shards
    (``clsuite.sharding.summed_over_processes``: the whole sum's value, its own shards' gradient)."""
    params = trainable(model)
    total, sharded = None, False
    for weights, anchor in stored:
        for n, p in params.items():
            w, a = weights.get(n), anchor.get(n)
            if w is None or a is None or w.shape != p.shape:
                continue
            sharded = sharded or distributed.is_sharded(p)
            w, a, p = distributed.local(w), distributed.local(a), distributed.local(p)
            dt = at_least_float32(p.dtype)
            term = (w.to(dt) * (p.to(dt) - a.to(dt)).pow(2)).sum()
            total = term if total is None else total + term.to(total.device)
    return sharding.summed_over_processes(total) if sharded and total is not None else total


def warn_unmatched(strategy: str) -> None:
    """The warning for a penalty that is zero because no stored name matches (pointing at the penalty's caller)."""
    warnings.warn(f"{strategy}: no stored parameter name matches a trainable parameter of the current model "
                  "(renamed by a parametrization?); the penalty is zero", RuntimeWarning, stacklevel=3)


def tensor_bytes(*stores: dict[str, torch.Tensor]) -> int:
    """Bytes of every tensor in ``stores``."""
    return sum(t.numel() * t.element_size() for d in stores for t in d.values())


def importance_state(experiences: list[int], importance: dict[str, torch.Tensor],
                     anchor: dict[str, torch.Tensor]) -> dict[str, Any]:
    """``{"experiences", "importance", "anchor"}``: one accumulated Ω and the latest anchor (mas, si)."""
    return {"experiences": list(experiences), "importance": dict(importance), "anchor": dict(anchor)}


def load_importance_state(state: dict[str, Any]) -> tuple[list[int], dict[str, torch.Tensor],
                                                          dict[str, torch.Tensor]]:
    """``(experiences, importance, anchor)`` of an ``importance_state``."""
    return list(state["experiences"]), dict(state["importance"]), dict(state["anchor"])
