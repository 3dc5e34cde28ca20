"""LookSAM (Liu et al. 2022): a SAM step every k steps, and in between one pass plus the stored part of SAM's
gradient orthogonal to the plain one (docs/efficient-sam.md)."""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from pydantic import Field

from clsuite import sharding
from clsuite.distributed import local
from clsuite.memory import RunShape, State
from clsuite.strategy import register
from clsuite.strategies.sam import _EPS, SAMParams, SharpnessAware


class LookSAMParams(SAMParams):
    k: int = Field(5, ge=1, description="a full SAM step every k optimizer steps (k=1: SAM)")
    alpha: float = Field(0.7, ge=0, description="weight of the reused orthogonal gradient, relative to ‖g‖")


def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """Σ ⟨a_i, b_i⟩ over the tensors (over every shard under FSDP), accumulated in float32 at least."""
    return sharding.global_dot(a, b)


def _into_fresh(closure: Callable[[], torch.Tensor], params: list[torch.Tensor]) -> torch.Tensor:
    """Run ``closure`` with ``.grad`` detached first, so its gradient goes to new tensors and the old ones are kept."""
    for p in params:
        p.grad = None
    return closure()


@register("looksam")
class LookSAM(SharpnessAware):
    """Every k steps a SAM step that stores ``g_v = g_s − (g·g_s/‖g‖²) g``; in between ``g + α‖g‖/‖g_v‖ · g_v``
    from one pass. ``g_v`` is dropped after each experience (its first step is a SAM step)."""
    description = "LookSAM: a SAM step every k steps, in between one pass plus the reused orthogonal SAM direction"
    Params = LookSAMParams

    def __init__(self, params: LookSAMParams | None = None):
        super().__init__(params)
        self._gv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # (parameter, its g_v)
        self._gv_norm = torch.zeros(())  # ‖g_v‖, fixed until the next SAM step

    def optimizer_step(self, ctx: Any, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        loss, params = self.first_pass(ctx, closure)  # g at w
        if self._gv is None or ctx.step % self.params.k == 0:
            done = self._sam_step(ctx, closure, params)
        else:
            done = self._reuse_step(ctx, params)
        return loss if done else self.diverged()

    def _sam_step(self, ctx: Any, closure: Callable[[], torch.Tensor], params: list[torch.Tensor]) -> bool:
        """SAM's step, keeping ``g_v`` and its norm; False, no step, when ``‖g‖`` is not finite."""
        self._gv = None
        g = [p.grad for p in params]  # g itself, not a copy: the pass at w + e writes g_s into new tensors
        held = sum(t.numel() * t.element_size() for t in g)
        if not self.sam_gradient(ctx, lambda: _into_fresh(closure, params), params, held):
            return False
        with torch.no_grad():  # g_v = g_s - (g·g_s / ‖g‖²) g, formed in g's storage, before clipping
            c = _dot(g, [p.grad for p in params]) / _dot(g, g).clamp_min(_EPS)
            for t, p in zip(g, params):
                local(t).mul_(-c.to(t.device)).add_(local(p.grad))  # shard by shard under FSDP
            self._gv = list(zip(params, g))
            self._gv_norm = self._global_norm(g)
        self.take_step(ctx, perturbed=True)
        return True

    def _reuse_step(self, ctx: Any, params: list[torch.Tensor]) -> bool:
        """``g <- g + α ‖g‖/‖g_v‖ g_v`` in place, then the base step; False, no step, when ``‖g‖`` is not finite."""
        with torch.no_grad():
            norm = float(self._global_norm(p.grad for p in params))
            if not math.isfinite(norm):
                return False
            scale = self.params.alpha * norm / max(float(self._gv_norm), _EPS)
            pairs = [(p.grad, v) for p, v in self._gv if p.grad is not None]
            if pairs:  # no temporary of g_v's size: the scaled g_v is added in place
                torch._foreach_add_([local(g) for g, _ in pairs], [local(v) for _, v in pairs], alpha=scale)
        self.take_step(ctx, perturbed=False)
        return True

    def after_training_exp(self, ctx: Any) -> None:
        """Drop ``g_v``: the next task's first step is a SAM step (and the memory is free meanwhile)."""
        self._gv = None

    def memory_state(self, run: RunShape) -> list[State]:
        """SAM's copy of ``w``, and ``g_v``, kept from one SAM step to the next."""
        return super().memory_state(run) + [State("g_v, the reused SAM direction", run.trainable)]
