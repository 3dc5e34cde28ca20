"""AE-SAM (Jiang et al. 2023): a SAM step only when the squared gradient norm is high against its running mean
and variance, a plain step otherwise (docs/efficient-sam.md)."""
from __future__ import annotations

import math
from typing import Any, Callable, Literal

import torch
from pydantic import Field

from clsuite.strategy import register
from clsuite.strategies.sam import SAMParams, SharpnessAware, ramp


class AESAMParams(SAMParams):
    c: float = Field(0.0, description="SAM when ‖g‖² > mean + c·std (initial c of the schedule)")
    delta: float = Field(0.9, gt=0, lt=1, description="decay of the moving mean and variance of ‖g‖²")
    c_schedule: Literal["constant", "linear"] = Field(
        "constant", description="constant c, or linear from c to c_end over each experience (Jiang et al.)")
    c_end: float = Field(0.0, description="final c of the linear schedule")


@register("aesam")
class AESAM(SharpnessAware):
    """``μ ← δμ + (1−δ)‖g‖²``, ``σ² ← δσ² + (1−δ)(‖g‖² − μ)²``, then SAM iff ``‖g‖² > μ + c σ``; a plain step
    costs one pass. μ and σ² carry over from one experience to the next (a new task's larger gradients trigger SAM)."""
    description = "AE-SAM: a SAM step only when the squared gradient norm exceeds its running mean by c stds"
    Params = AESAMParams

    def __init__(self, params: AESAMParams | None = None):
        super().__init__(params)
        self.mean = 0.0  # moving mean of ‖g‖² (Jiang et al.: both start at 0)
        self.var = 0.0  # moving variance of ‖g‖²

    def c_at(self, step: int, steps: int) -> float:
        """The threshold in standard deviations at optimizer step ``step`` of an experience of ``steps`` steps."""
        p = self.params
        return p.c if p.c_schedule == "constant" else p.c + (p.c_end - p.c) * ramp(step, steps)

    def optimizer_step(self, ctx: Any, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        loss, params = self.first_pass(ctx, closure)
        with torch.no_grad():
            sq = float(self._global_norm(p.grad for p in params)) ** 2
        if not math.isfinite(sq):
            return self.diverged()
        d = self.params.delta
        self.mean = d * self.mean + (1 - d) * sq
        self.var = d * self.var + (1 - d) * (sq - self.mean) ** 2
        if sq > self.mean + self.c_at(ctx.step, ctx.total_steps) * math.sqrt(self.var):
            if not self.perturb_and_step(ctx, closure, params):
                return self.diverged()
        else:
            self.take_step(ctx, perturbed=False)
        return loss

    def state_dict(self) -> dict[str, Any]:
        """The moving statistics of ‖g‖² and the cost counters."""
        return {**super().state_dict(), "mean": self.mean, "var": self.var}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.mean, self.var = float(state["mean"]), float(state["var"])
