"""Momentum-SAM (Becker et al. 2024): perturb along the optimizer's negative momentum instead of the gradient,
so a step costs one pass (docs/efficient-sam.md)."""
from __future__ import annotations

import math
from typing import Any, Callable, Literal

import torch
from pydantic import Field, model_validator

from clsuite.distributed import local
from clsuite.errors import UserError
from clsuite.strategy import Params, register
from clsuite.strategies.sam import _EPS, SharpnessAware

# optimizers whose state holds a first moment under "exp_avg"
_EXP_AVG = (torch.optim.Adam, torch.optim.AdamW, torch.optim.NAdam, torch.optim.RAdam, torch.optim.Adamax)


class MSAMParams(Params):
    rho: float = Field(0.75, gt=0, description="radius along the momentum (Becker et al. use 15x SAM's rho)")
    schedule: Literal["constant", "linear"] = Field(
        "constant", description="constant rho, or linear decay from rho to rho_min over each experience")
    rho_min: float = Field(0.0, ge=0, description="final rho of the linear schedule")

    @model_validator(mode="after")
    def _rho_min_below_rho(self) -> "MSAMParams":
        if self.schedule == "linear" and self.rho_min > self.rho:
            raise ValueError(f"rho_min {self.rho_min} must not exceed rho {self.rho} (the schedule decays)")
        return self


def momentum_key(opt: torch.optim.Optimizer) -> str:
    """The optimizer-state key of the momentum MSAM follows; UserError for an optimizer without one."""
    if isinstance(opt, _EXP_AVG):
        return "exp_avg"
    if isinstance(opt, torch.optim.SGD) and all(g["momentum"] > 0 for g in opt.param_groups):
        return "momentum_buffer"
    raise UserError(f"msam perturbs along the optimizer's momentum and {type(opt).__name__} (as configured) keeps "
                    "none: use optimizer=AdamW (or Adam, NAdam, RAdam, Adamax), or another update rule such as sam")


@register("msam")
class MSAM(SharpnessAware):
    """``e = −ρ m/‖m‖`` (m: AdamW's ``exp_avg`` or SGD's momentum buffer, one global norm), the one pass at ``w + e``,
    ``w`` restored, the base step; the first step of each experience (a fresh optimizer, no momentum) is plain."""
    description = "momentum-SAM: the gradient at w - rho m/‖m‖ along the optimizer's momentum m, one pass per step"
    Params = MSAMParams

    def optimizer_step(self, ctx: Any, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        key = momentum_key(ctx.optimizer)
        state = ctx.optimizer.state
        momenta = {p: state[p][key] for p in ctx.trainable_parameters()
                   if p in state and state[p].get(key) is not None}
        if not momenta:  # no step taken yet in this experience
            loss = closure()
            self.take_step(ctx, perturbed=False)
            return loss
        with torch.no_grad():
            norm = self._global_norm(momenta.values())
            if not math.isfinite(float(norm)):
                return self.diverged()
            factor = -self.rho_at(ctx.step, ctx.total_steps) / norm.clamp_min(_EPS)
        loss = self.pass_at(closure, list(momenta), lambda p: (local(momenta[p]) * factor.to(p.device)).to(p.dtype))
        self.take_step(ctx, perturbed=True)
        return loss  # the objective at w + e: MSAM makes no pass at w
