"""Stochastic SAM (SS-SAM, Zhao et al. 2022; RST, Zhao, Zhang & Hu 2022): each step is a SAM step with
probability p, a plain step otherwise (docs/efficient-sam.md)."""
from __future__ import annotations

import random
from typing import Any, Callable, Literal

import torch
from pydantic import Field, model_validator

from clsuite.strategy import register
from clsuite.strategies.sam import SAMParams, SharpnessAware, ramp


class SSSAMParams(SAMParams):
    p: float = Field(0.5, ge=0, le=1, description="probability of a SAM step (final one of the linear schedule)")
    p_schedule: Literal["constant", "linear"] = Field(
        "constant", description="constant p, or linear increase from p_min to p over each experience")
    p_min: float = Field(0.0, ge=0, le=1, description="initial p of the linear schedule")

    @model_validator(mode="after")
    def _p_min_below_p(self) -> "SSSAMParams":
        if self.p_schedule == "linear" and self.p_min > self.p:
            raise ValueError(f"p_min {self.p_min} must not exceed p {self.p} (the schedule increases)")
        return self


@register("sssam")
class SSSAM(SharpnessAware):
    """A SAM step when ``u < p_t``, ``u`` uniform from a generator of its own seeded by (run seed, experience,
    step): no other plugin's or the engine's random stream shifts, and every data-parallel rank draws alike."""
    description = "stochastic SAM (SS-SAM/RST): a SAM step with probability p, a plain step otherwise"
    Params = SSSAMParams

    def p_at(self, step: int, steps: int) -> float:
        """The probability of a SAM step at optimizer step ``step`` (0-based) of an experience of ``steps`` steps."""
        p = self.params
        return p.p if p.p_schedule == "constant" else p.p_min + (p.p - p.p_min) * ramp(step, steps)

    @staticmethod
    def draw(seed: int, experience: int, step: int) -> float:
        """The uniform number in [0, 1) that decides step ``step`` of ``experience`` in a run of ``seed``."""
        return random.Random(f"clsuite-sssam-{seed}-{experience}-{step}").random()

    def optimizer_step(self, ctx: Any, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        sam = self.draw(ctx.config.seed, ctx.experience, ctx.step) < self.p_at(ctx.step, ctx.total_steps)
        loss, params = self.first_pass(ctx, closure)
        if not sam:
            self.take_step(ctx, perturbed=False)
        elif not self.perturb_and_step(ctx, closure, params):
            return self.diverged()
        return loss
