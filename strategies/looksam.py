"""LookSAM (Liu et al. 2022): a SAM step every k steps, and in between one pass plus the stored part of SAM's
gradient orthogonal to the plain one (docs/efficient-sam.md)."""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from pydantic import Field

from clsuite.numerics import at_least_float32
from clsuite.strategy import register
from clsuite.strategies.sam import _EPS, SAMParams, SharpnessAware


class LookSAMParams(SAMParams):
    k: int = Field(5, ge=1, description="a full SAM step every k optimizer steps (k=1: SAM)")
    alpha: float = Field(0.7, ge=0, description="weight of the reused orthogonal gradient, relative to ‖g‖")


def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """Σ ⟨a_i, b_i⟩ over the tensors, accumulated in float32 at least."""
    wide = at_least_float32(a[0].dtype)
    return torch.stack([torch.sum(x.to(wide) * y.to(wide)) for x, y in zip(a, b)]).sum()


@register("looksam")
class LookSAM(SharpnessAware):
    """Every k steps a SAM step that stores ``g_v = g_s − (g·g_s/‖g‖²) g``; in between ``g + α‖g‖/‖g_v‖ · g_v``
    from one pass. ``g_v`` is dropped after each experience (its first step is a SAM step)."""
    description = "LookSAM: a SAM step every k steps, in between one pass plus the reused orthogonal SAM direction"
    Params = LookSAMParams

    def __init__(self, params: LookSAMParams | None = None):
        super().__init__(params)
        self._gv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # (parameter, its g_v)

    def optimizer_step(self, ctx: Any, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        loss, params = self.first_pass(ctx, closure)  # g at w
        if self._gv is None or ctx.step % self.params.k == 0:
            self._gv = None
            with torch.no_grad():
                g = [p.grad.detach().clone() for p in params]
            if not self.sam_gradient(ctx, closure, params, held=sum(t.numel() * t.element_size() for t in g)):
                return self.diverged()
            with torch.no_grad():  # g_v = g_s - (g·g_s / ‖g‖²) g, formed in g's storage, before clipping
                c = _dot(g, [p.grad for p in params]) / _dot(g, g).clamp_min(_EPS)
                for t, p in zip(g, params):
                    t.mul_(-c.to(t.device)).add_(p.grad)
            self._gv = list(zip(params, g))
            self.take_step(ctx, perturbed=True)
            return loss
        with torch.no_grad():  # g <- g + alpha ‖g‖/‖g_v‖ g_v
            norm = self._global_norm(p.grad for p in params)
            if not math.isfinite(float(norm)):
                return self.diverged()
            scale = self.params.alpha * norm / self._global_norm(v for _, v in self._gv).clamp_min(_EPS)
            for p, v in self._gv:
                if p.grad is not None:
                    p.grad.add_(v * scale.to(v.device))
        self.take_step(ctx, perturbed=False)
        return loss

    def after_training_exp(self, ctx: Any) -> None:
        """Drop ``g_v``: the next task's first step is a SAM step (and the memory is free meanwhile)."""
        self._gv = None
