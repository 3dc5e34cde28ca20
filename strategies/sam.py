"""Sharpness-aware minimization (Foret et al. 2021) and its adaptive variant ASAM (Kwon et al. 2021).

One optimizer step makes exactly two passes through the engine's closure (the *full* objective):

1. ``g = ∇L(w)`` at the current weights;
2. ``e = ρ g / ‖g‖₂`` (SAM) or ``e = ρ T² g / ‖T g‖₂`` with ``T = |w| + η`` element-wise (ASAM);
   the weights move to ``w + e``;
3. ``g_sam = ∇L(w + e)``;
4. the weights are restored to ``w`` and the base optimizer (``ctx.base_step()``: clipping, then AdamW/SGD/…)
   steps with ``g_sam``.

Details that public implementations get wrong, and how this one handles them:

* **Global norm.** ``‖g‖`` is one norm over *all* trainable parameters that received a gradient, not a norm
  per tensor (or per FSDP shard, as in the reference code of Li et al. 2024): every tensor's ``e`` is scaled by
  the same factor, so ``‖e‖₂ = ρ`` over the whole model. The norms are taken in float32 whatever the parameter
  dtype, with a guard ``max(‖g‖, 1e-12)`` so a zero gradient gives ``e = 0`` rather than NaN.
* **Gradient accumulation.** The engine's closure zeroes the gradients, runs forward+backward over *all* the
  step's micro-batches and returns only when they are summed, so ``g`` (pass 1) is the gradient of the whole
  step's batch before any perturbation is made, and pass 2 again accumulates every micro-batch at ``w + e``.
  Nothing is lost between the passes, and ``grad_accum=k`` gives the same update as one batch of the same
  examples (the engine's loss is a per-example mean, see ``clsuite.data.lm_loss``).
* **Penalty terms and replay.** Each pass calls every loss plugin's ``before_backward`` and uses the batch the
  data plugins built, so EWC's penalty and replayed examples are in ``g_sam`` too.
* **DDP.** Under data parallelism (``clsuite.distributed``) the engine's closure ends by averaging ``.grad`` over
  ranks, so after each pass the gradient is the global batch's, ``‖g‖`` is global over devices as well as
  parameters, and every replica computes the same ``e`` (the replicas stay identical; ``rho`` does not change
  with the number of processes). Skipping the first pass's all-reduce (``no_sync``) would give per-device perturbations
  (Foret et al.'s m-sharpness) at one all-reduce less; clsuite does not do that. A sharded engine (FSDP) must
  all-reduce the squared shard norms before ``e`` is formed; ``_global_norm`` is the one place to do it.
* **Exact restore.** Subtracting ``e`` after adding it is not exact in floating point (``(w + e) − e ≠ w`` in
  the last bit for many elements), so the weights at ``w`` are saved before the perturbation and copied back.
  That copy is what ``extra_memory_bytes`` reports (one copy of the trainable parameters, held during a step;
  ``e`` is formed and added one tensor at a time, so it adds at most one tensor's worth).
* **Non-finite gradients** (e.g. fp16 overflow): when ``‖g‖`` is not finite no perturbation is made, no step is
  taken, and NaN is returned as the loss, so the engine stops with a ``DivergenceError`` instead of writing NaN
  into the weights.
* **Randomness.** The two passes share the batch but not dropout masks; Llama-family models have no dropout by
  default. There are no BatchNorm statistics to update twice in these models.

Cost: two forward+backward passes per step (the engine counts both in ``ctx.example_passes``, so the record's
compute multiplier is 2).

The loss returned (and logged by the engine) is the objective at ``w``, from the first pass.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Literal

import torch
from pydantic import Field, model_validator

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


@register("sam")
class SAM(Strategy):
    kind = "update"
    description = "sharpness-aware minimization: step with the gradient at the worst point of a rho-ball"
    Params = SAMParams

    def __init__(self, params: SAMParams | None = None):
        super().__init__(params)
        self._copy_bytes = 0

    # --- the update rule -------------------------------------------------------------------------------
    def rho_at(self, step: int, steps: int) -> float:
        """The radius at optimizer step ``step`` (0-based) of an experience of ``steps`` steps."""
        p = self.params
        if p.schedule == "constant":
            return p.rho
        frac = min(1.0, max(0.0, step / max(1, steps - 1)))
        return p.rho + (p.rho_min - p.rho) * frac

    @staticmethod
    def _global_norm(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
        """‖concat(tensors)‖₂ over all tensors at once, accumulated in float32 (float64 kept). ``tensors`` may be
        a generator: each tensor is reduced to its norm before the next is made."""
        norms = [torch.linalg.vector_norm(t, dtype=torch.promote_types(t.dtype, torch.float32)) for t in tensors]
        if not norms:
            return torch.zeros(())
        dev = norms[0].device
        return torch.linalg.vector_norm(torch.stack([n.to(dev) for n in norms]))

    def _scale(self, p: torch.Tensor) -> torch.Tensor:
        """ASAM's T = |w| + eta (a fresh tensor)."""
        return p.detach().abs().add_(self.params.eta)

    def perturbation(self, params: list[torch.Tensor], rho: float) -> list[torch.Tensor] | None:
        """``e`` for each parameter (same order), from the gradients in ``.grad``; None if they are not finite.

        (``optimizer_step`` does not call this: it adds each ``e`` in place as it is formed, so that no more than
        one tensor's ``e`` exists at a time. Kept for inspection and tests.)"""
        factor = self._factor(params, rho)
        if factor is None:
            return None
        return [self._e(p, factor) for p in params]

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
        g = p.grad
        if self.params.adaptive:
            t = self._scale(p)
            return (t * t * g * factor.to(g.device)).to(p.dtype)
        return (g * factor.to(g.device)).to(p.dtype)

    def optimizer_step(self, ctx: Any, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        loss = closure()  # pass 1: g at w (all micro-batches, every loss plugin's term)
        params = [p for p in ctx.trainable_parameters() if p.grad is not None]
        rho = self.rho_at(ctx.step, ctx.total_steps)
        with torch.no_grad():
            factor = self._factor(params, rho)
            if factor is None:
                return torch.full((), float("nan"))
            saved = [p.detach().clone() for p in params]
            self._copy_bytes = max(self._copy_bytes, sum(s.numel() * s.element_size() for s in saved))
            for p in params:
                p.add_(self._e(p, factor))
        closure()  # pass 2: g_sam at w + e (same batch, penalties evaluated at w + e)
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)  # bit-exact restore; (w + e) - e would not be
        del saved
        ctx.base_step()
        return loss

    # --- cost and state ----------------------------------------------------------------------------------
    def extra_memory_bytes(self) -> int:
        """One copy of the trainable parameters (the saved ``w``), held during each step; the largest seen."""
        return self._copy_bytes

    def state_dict(self) -> dict[str, Any]:
        """SAM keeps nothing between steps (the saved weights live only inside a step)."""
        return {"copy_bytes": self._copy_bytes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._copy_bytes = int(state.get("copy_bytes", 0))


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
