"""Sharpness-aware minimization (Foret et al. 2021) and adaptive SAM (Kwon et al. 2021): two passes of the full
objective per step, one global norm, exact restore (docs/sam.md); ``SharpnessAware`` holds what the efficient
variants share with them (docs/efficient-sam.md). Under ``parallel=fsdp`` each process holds a shard of every
tensor: norms and dot products go through ``clsuite.sharding`` (over every shard), the rest works shard by shard."""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Literal

import torch
from pydantic import Field, model_validator

from clsuite import sharding
from clsuite.distributed import local
from clsuite.memory import RunShape, State
from clsuite.strategy import Params, Strategy, register

_EPS = 1e-12


class SAMParams(Params):
    rho: float = Field(0.05, gt=0, description="radius of the perturbation ball (‖e‖₂ = rho for SAM)")
    adaptive: bool = Field(False, description="ASAM: scale the ball by T = |w| + eta (scale-invariant)")
    eta: float = Field(0.01, ge=0, description="ASAM's offset in T = |w| + eta (Kwon et al.: 0.01)")
    schedule: Literal["constant", "linear"] = Field(
        "constant", description="constant rho, or linear decay from rho to rho_min over each experience")
    rho_min: float = Field(0.0, ge=0, description="final rho of the linear schedule")

    @model_validator(mode="after")
    def _rho_min_below_rho(self) -> "SAMParams":
        if self.schedule == "linear" and self.rho_min > self.rho:
            raise ValueError(f"rho_min {self.rho_min} must not exceed rho {self.rho} (the schedule decays)")
        return self


def ramp(step: int, steps: int) -> float:
    """A linear schedule's progress: 0 at an experience's first optimizer step (of ``steps``), 1 at its last."""
    return min(1.0, max(0.0, step / max(1, steps - 1)))


class SharpnessAware(Strategy):
    """What SAM and its efficient variants share (not registered itself): the radius, the perturbation from the
    gradient in ``.grad`` with one global norm, the pass at ``w + e`` with a bit-exact restore, and the count of
    steps that used a perturbed gradient (``cost_report``)."""
    kind = "update"
    Params = SAMParams

    def __init__(self, params: Params | None = None):
        super().__init__(params)
        self._copy_bytes = 0
        self.steps = 0  # optimizer steps taken over the run
        self.sam_steps = 0  # of them, those whose update used a gradient at perturbed weights

    # --- the update rule -------------------------------------------------------------------------------
    def rho_at(self, step: int, steps: int) -> float:
        """The radius at optimizer step ``step`` (0-based) of an experience of ``steps`` steps."""
        p = self.params
        if p.schedule == "constant":
            return p.rho
        return p.rho + (p.rho_min - p.rho) * ramp(step, steps)

    @staticmethod
    def _global_norm(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
        """‖concat(tensors)‖₂ over all tensors at once, and over every shard of each under FSDP, accumulated in
        float32 (float64 kept): ``clsuite.sharding.global_norm``. ``tensors`` may be a generator."""
        return sharding.global_norm(tensors)

    def _scale(self, p: torch.Tensor) -> torch.Tensor:
        """ASAM's T = |w| + eta (a fresh tensor; sharded like ``p``)."""
        return p.detach().abs().add_(self.params.eta)

    def _factor(self, params: list[torch.Tensor], rho: float) -> torch.Tensor | None:
        """rho / ‖g‖ (SAM) or rho / ‖T g‖ (ASAM), the norm global over ``params``; None if it is not finite."""
        if self.params.adaptive:
            norm = self._global_norm(self._scale(p) * p.grad for p in params)
        else:
            norm = self._global_norm(p.grad for p in params)
        if not math.isfinite(float(norm)):
            return None
        return rho / norm.clamp_min(_EPS)

    def _e(self, p: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        """This process's part of the perturbation of ``p``: ``factor · g`` (ASAM: ``factor · T² g``)."""
        g = local(p.grad)
        if self.params.adaptive:
            t = local(self._scale(p))
            return (t * t * g * factor.to(g.device)).to(p.dtype)
        return (g * factor.to(g.device)).to(p.dtype)

    @staticmethod
    def first_pass(ctx: Any, closure: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Pass 1: ``g = ∇L(w)`` left in ``.grad`` (all micro-batches, every loss plugin's term); returns the loss
        and the trainable parameters that received a gradient."""
        loss = closure()
        return loss, [p for p in ctx.trainable_parameters() if p.grad is not None]

    def pass_at(self, closure: Callable[[], torch.Tensor], params: list[torch.Tensor],
                e: Callable[[torch.Tensor], torch.Tensor], held: int = 0) -> torch.Tensor:
        """Move each of ``params`` by ``e(p)`` (formed one tensor at a time), run ``closure`` there (its gradient
        stays in ``.grad``), then restore ``w`` bit-exactly by copy; returns its loss. Under FSDP each process moves
        and restores its own shards (``e(p)``: the local part, or a tensor sharded like ``p``). ``held``: bytes the
        caller keeps meanwhile, counted with the copy in ``extra_memory_bytes`` (over all processes)."""
        with torch.no_grad():
            saved = [local(p).clone() for p in params]
            self._copy_bytes = max(self._copy_bytes, held + sum(p.numel() * p.element_size() for p in params))
            for p in params:
                local(p).add_(local(e(p)))
        loss = closure()  # at w + e: same batch, every penalty evaluated at w + e
        with torch.no_grad():
            for p, s in zip(params, saved):
                local(p).copy_(s)  # bit-exact restore; (w + e) - e would not be
        return loss

    def sam_gradient(self, ctx: Any, closure: Callable[[], torch.Tensor], params: list[torch.Tensor],
                     held: int = 0) -> bool:
        """Replace ``g`` in ``.grad`` (from ``first_pass``) by ``∇L(w + e)``, ``e = ρ g/‖g‖`` (ASAM's when adaptive),
        ``w`` restored; False, nothing changed, when ``‖g‖`` is not finite."""
        with torch.no_grad():
            factor = self._factor(params, self.rho_at(ctx.step, ctx.total_steps))
        if factor is None:
            return False
        self.pass_at(closure, params, lambda p: self._e(p, factor), held)
        return True

    def perturb_and_step(self, ctx: Any, closure: Callable[[], torch.Tensor], params: list[torch.Tensor]) -> bool:
        """The rest of a SAM step after ``first_pass``: the gradient at ``w + e``, then the base optimizer's step;
        False, no step taken, when ``‖g‖`` is not finite."""
        if not self.sam_gradient(ctx, closure, params):
            return False
        self.take_step(ctx, perturbed=True)
        return True

    def take_step(self, ctx: Any, perturbed: bool) -> None:
        """The base optimizer's step (clipping first) with the gradient now in ``.grad``, counted for the cost."""
        self.steps += 1
        self.sam_steps += int(perturbed)
        ctx.base_step()

    @staticmethod
    def diverged() -> torch.Tensor:
        """The loss returned when no step was taken for a non-finite gradient: the engine stops on it."""
        return torch.full((), float("nan"))

    # --- cost and state ----------------------------------------------------------------------------------
    def memory_state(self, run: RunShape) -> list[State]:
        """The copy of ``w`` that ``pass_at`` keeps while the objective is evaluated at ``w + e``."""
        return [State("weights saved during the pass at w + e", run.trainable, when="update")]

    def extra_memory_bytes(self) -> int:
        """One copy of the trainable parameters (the saved ``w``), held during each step; the largest seen."""
        return self._copy_bytes

    def cost_report(self) -> dict[str, float]:
        """``sam_step_fraction``: the share of optimizer steps whose update used a gradient at perturbed weights."""
        return {"sam_step_fraction": self.sam_steps / self.steps} if self.steps else {}

    def state_dict(self) -> dict[str, Any]:
        """The cost counters (the saved weights live only inside a step)."""
        return {"copy_bytes": self._copy_bytes, "steps": self.steps, "sam_steps": self.sam_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._copy_bytes = int(state.get("copy_bytes", 0))
        self.steps, self.sam_steps = int(state.get("steps", 0)), int(state.get("sam_steps", 0))


@register("sam")
class SAM(SharpnessAware):
    description = "sharpness-aware minimization: step with the gradient at the worst point of a rho-ball"
    Params = SAMParams

    def optimizer_step(self, ctx: Any, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        loss, params = self.first_pass(ctx, closure)  # pass 1: g at w
        if not self.perturb_and_step(ctx, closure, params):  # pass 2: g_sam at w + e; restore; base step
            return self.diverged()
        return loss  # the objective at w


class ASAMParams(SAMParams):
    rho: float = Field(0.5, gt=0, description="radius of the adaptive ball (Kwon et al. use ~10x SAM's rho)")
    adaptive: bool = Field(True, description="ASAM: scale the ball by T = |w| + eta (scale-invariant)")


@register("asam")
class ASAM(SAM):
    """Adaptive SAM: ``e = ρ T² g / ‖T g‖₂``, ``T = |w| + η``. The ball is measured relative to the weights'
    magnitudes, so its useful radius is larger than SAM's: the default ρ = 0.5 (and η = 0.01) follows Kwon et
    al. (2021) and their reference code (SamsungLabs/ASAM), which pairs ASAM ρ = 0.5 with SAM ρ = 0.05.

    T scales *every* trainable tensor here; the reference code scales only parameters whose name contains
    ``weight`` (biases get T = 1). Llama-family models have no biases, so the two agree there."""
    description = "adaptive SAM (ASAM): the rho-ball scaled element-wise by |w| + eta"
    Params = ASAMParams
