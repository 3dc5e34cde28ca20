"""Averaged gradient episodic memory (Chaudhry et al. 2019): project the step's gradient when it conflicts with the
gradient of a memory batch of past examples (docs/strategies.md)."""
from __future__ import annotations

import math
import random
from typing import Any

import torch
from pydantic import Field

from clsuite import distributed
from clsuite.errors import DivergenceError
from clsuite.memory import RunShape, State, autocast_enabled
from clsuite.numerics import at_least_float32
from clsuite.strategies.replay import buffer_bytes, reservoir_add, untagged
from clsuite.strategy import Params, Strategy, register


class AGEMParams(Params):
    size: int = Field(200, ge=1, description="memory capacity in examples (a reservoir over every past task)")
    sample: int = Field(8, ge=1, description="memory examples in the reference gradient of each optimizer step")


def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """Σ ⟨a_i, b_i⟩ over the tensors, accumulated in float32 at least."""
    wide = at_least_float32(a[0].dtype)
    return torch.stack([torch.sum(x.to(wide) * y.to(wide)).to(a[0].device) for x, y in zip(a, b)]).sum()


def project(grads: list[torch.Tensor], ref: list[torch.Tensor]) -> bool:
    """A-GEM's rule in place: if g·g_ref < 0, g ← g − (g·g_ref / ‖g_ref‖²) g_ref (dot products over all tensors);
    returns whether it projected."""
    dot = _dot(grads, ref)
    if not dot < 0:
        return False
    c = dot / _dot(ref, ref)
    for g, r in zip(grads, ref):
        g.sub_((c.to(r.device) * r).to(g.dtype))
    return True


@register("agem")
class AGEM(Strategy):
    """Before every optimizer step (after all of an update rule's passes: with SAM the SAM gradient), the gradient
    is projected onto the half-space where it does not increase the memory batch's loss, to first order."""
    kind = "gradient"
    description = "A-GEM: project each step's gradient so that it does not increase the loss of a memory batch"
    Params = AGEMParams

    def __init__(self, params: AGEMParams | None = None):
        super().__init__(params)
        self.buffer: list[dict[str, Any]] = []  # rows, each with "_task"
        self.seen = 0
        self.counts = {"steps": 0, "projected": 0, "ref_bytes": 0}

    def memory_batch(self, seed: int, experience: int, step: int) -> list[dict]:
        """The memory rows of one step's reference gradient: seeded by run seed, experience and step (not
        ``ctx.rng``), without replacement."""
        rng = random.Random(f"clsuite-agem-{seed}-{experience}-{step}")
        return [untagged(r) for r in rng.sample(self.buffer, min(self.params.sample, len(self.buffer)))]

    def reference_gradient(self, ctx: Any, rows: list[dict], params: list[torch.Tensor]) -> list[torch.Tensor]:
        """g_ref: the gradient of the mean task loss of ``rows`` at the current weights, one tensor per parameter
        (zeros where unused). Each rank takes a strided share in ``grad_accum`` chunks; the sums are all-reduced."""
        cfg = ctx.config.train
        ref = [torch.zeros_like(p, dtype=at_least_float32(p.dtype)) for p in params]
        mine = distributed.shard(rows)
        size = math.ceil(len(mine) / cfg.grad_accum) if mine else 1
        for i in range(0, len(mine), size):
            with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=autocast_enabled(cfg)):
                loss = ctx.loss(mine[i:i + size], reduction="none").sum()
            for r, g in zip(ref, torch.autograd.grad(loss, params, allow_unused=True)):
                if g is not None:
                    r.add_(g.to(r.dtype))
        distributed.all_reduce_sum_(ref)
        ctx.example_passes += len(rows)
        return [r.div_(len(rows)) for r in ref]

    # --- hooks -------------------------------------------------------------------------------------------
    def before_update(self, ctx: Any) -> None:
        self.counts["steps"] += 1
        if not self.buffer:
            return
        params = ctx.trainable_parameters()
        ref = self.reference_gradient(ctx, self.memory_batch(ctx.config.seed, ctx.experience, ctx.step), params)
        self.counts["ref_bytes"] = max(self.counts["ref_bytes"], sum(r.numel() * r.element_size() for r in ref))
        if not all(torch.isfinite(r).all() for r in ref):
            raise DivergenceError(f"non-finite A-GEM reference gradient at step {ctx.step} of task "
                                  f"{getattr(ctx.task, 'name', '?')!r}; lower the learning rate")
        with torch.no_grad():  # a parameter without a gradient has g = 0 there, which the projection may change
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
            if project(grads, ref):
                self.counts["projected"] += 1
                for p, g in zip(params, grads):
                    if p.grad is None and g.any():
                        p.grad = g

    def after_training_exp(self, ctx: Any) -> None:
        """Offer the finished task's training rows to the reservoir (its own rows, never replayed ones)."""
        if ctx.task is None or ctx.task.train is None:
            return
        rng = random.Random(f"clsuite-agem-{ctx.config.seed}-{ctx.experience}-memory")
        self.buffer = reservoir_add(self.buffer, self.seen, ctx.task.name, ctx.task.train, self.params.size, rng)
        self.seen += len(ctx.task.train)

    # --- cost and state ----------------------------------------------------------------------------------
    def memory_state(self, run: RunShape) -> list[State]:
        """The reference gradient during each step (its memory rows are text)."""
        return [State("reference gradient", run.trainable, "fp32", when="step")]

    def extra_memory_bytes(self) -> int:
        """The memory's strings and the reference gradient (one float32 tensor per trainable parameter)."""
        return buffer_bytes(self.buffer) + self.counts["ref_bytes"]

    def cost_report(self) -> dict[str, float]:
        """``agem_projected_fraction``: the share of optimizer steps whose gradient was projected."""
        steps = self.counts["steps"]
        return {"agem_projected_fraction": self.counts["projected"] / steps} if steps else {}

    def state_dict(self) -> dict[str, Any]:
        return {"buffer": [dict(r) for r in self.buffer], "seen": self.seen, "counts": dict(self.counts)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffer = [dict(r) for r in state["buffer"]]
        self.seen = int(state["seen"])
        self.counts = {k: int(state["counts"].get(k, 0)) for k in self.counts}
