"""Synaptic intelligence (Zenke et al. 2017): importance from each weight's share of the loss decrease along the
training path, a quadratic penalty towards the latest weights (docs/strategies.md)."""
from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from clsuite.memory import RunShape, State, quadratic_penalty
from clsuite.numerics import at_least_float32
from clsuite.strategies._anchored import (importance_state, load_importance_state, lora_merge_conflict,
                                          quadratic_sum, tensor_bytes, trainable)
from clsuite.strategy import Params, Strategy, register


class SIParams(Params):
    lam: float = Field(0.1, ge=0, alias="lambda", description="penalty strength, Zenke et al.'s c (λ Σ Ω (θ − θ̃)²)")
    xi: float = Field(1e-3, gt=0, description="damping ξ in Ω = ω / (Δ² + ξ)")


@register("si")
class SI(Strategy):
    """Per task ω = −Σ_steps g·Δθ (g: the gradient in ``.grad`` when a step begins, Δθ: the step), then
    Ω += max(0, ω / (Δ² + ξ)), Δ the task's net displacement; penalty λ Σ Ω (θ − θ̃)², θ̃ the latest task's weights."""
    kind = "loss"
    description = "synaptic intelligence: penalise moving weights that contributed most to earlier loss decreases"
    Params = SIParams
    conflicts = (lora_merge_conflict(),)
    # Held during an experience only: class defaults, deleted after it.
    _omega: dict[str, torch.Tensor] | None = None  # −Σ g·Δθ
    _moved: dict[str, torch.Tensor] | None = None  # Σ Δθ, the net displacement
    _pending: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]] | None = None  # (name, p, g, θ before)
    _optimizer: Any = None
    _hook: Any = None

    def __init__(self, params: SIParams | None = None):
        super().__init__(params)
        self.importance: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}
        self.experiences: list[int] = []
        self.peak_bytes = 0

    # --- the path integral ---------------------------------------------------------------------------------
    def before_training_exp(self, ctx: Any) -> None:
        if ctx.stream is not None and ctx.experience == len(ctx.stream.tasks) - 1:
            return  # after the last task nothing is penalised: no path integral
        params = trainable(ctx.model)
        self._omega = {n: torch.zeros_like(p, dtype=at_least_float32(p.dtype)) for n, p in params.items()}
        self._moved = {n: torch.zeros_like(p, dtype=at_least_float32(p.dtype)) for n, p in params.items()}

    def before_update(self, ctx: Any) -> None:
        """Keep g (before other plugins project it and before clipping) and θ; the optimizer's post-step hook adds
        −g·Δθ once the step is taken."""
        if self._omega is None:
            return
        if ctx.optimizer is not self._optimizer:  # a fresh optimizer per experience
            if self._hook is not None:
                self._hook.remove()
            self._optimizer, self._hook = ctx.optimizer, ctx.optimizer.register_step_post_hook(self._after_step)
        with torch.no_grad():
            self._pending = [(n, p, p.grad.detach().to(self._omega[n].dtype, copy=True),
                              p.detach().to(self._omega[n].dtype, copy=True))
                             for n, p in ctx.model.named_parameters() if n in self._omega and p.grad is not None]
        held = tensor_bytes(self._omega, self._moved) \
            + sum(g.numel() * g.element_size() + b.numel() * b.element_size() for _, _, g, b in self._pending)
        self.peak_bytes = max(self.peak_bytes, held)

    def _after_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        with torch.no_grad():
            for n, p, g, before in self._pending or []:
                step = p.detach().to(before.dtype) - before
                self._omega[n].sub_(g * step)
                self._moved[n].add_(step)
        self._pending = None

    def after_training_exp(self, ctx: Any) -> None:
        """Ω += max(0, ω / (Δ² + ξ)); θ̃ ← the weights now (after any Wise-FT, which runs earlier)."""
        if self._omega is not None:
            for n, om in self._omega.items():
                new = (om / (self._moved[n].pow(2) + self.params.xi)).clamp_(min=0)
                old = self.importance.get(n)
                self.importance[n] = new if old is None or old.shape != new.shape else old.to(new.device) + new
            self.anchor = {n: p.detach().clone() for n, p in ctx.model.named_parameters() if n in self.importance}
            self.experiences.append(ctx.experience)
        if self._hook is not None:
            self._hook.remove()
        for name in ("_omega", "_moved", "_pending", "_optimizer", "_hook"):
            vars(self).pop(name, None)

    # --- the penalty -----------------------------------------------------------------------------------------
    def penalty(self, model: torch.nn.Module) -> torch.Tensor | None:
        """λ Σ_i Ω_i (θ_i − θ̃_i)² over matching trainable parameters; None before the first finished task."""
        total = quadratic_sum(model, [(self.importance, self.anchor)])
        return None if total is None else self.params.lam * total

    def before_backward(self, ctx: Any) -> torch.Tensor | None:
        return None if self.params.lam == 0 or not self.importance else self.penalty(ctx.model)

    # --- cost and state --------------------------------------------------------------------------------------
    def memory_state(self, run: RunShape) -> list[State]:
        """With two tasks or more: Ω and θ̃, the path integral and the net displacement, and g and θ at each step."""
        if run.tasks < 2:
            return []
        return [State("importance", run.trainable, "fp32"), State("anchor", run.trainable),
                *quadratic_penalty(run, 1, "θ − θ̃"),
                State("path integral and displacement", 2 * run.trainable, "fp32"),
                State("gradient and weights before the step", 2 * run.trainable, "fp32", when="step")]

    def extra_memory_bytes(self) -> int:
        """Ω and θ̃, plus the largest in-experience set held (ω, Σ Δθ, and g and θ during a step; float32 at least)."""
        return tensor_bytes(self.importance, self.anchor) + self.peak_bytes

    def state_dict(self) -> dict[str, Any]:
        return {**importance_state(self.experiences, self.importance, self.anchor), "peak_bytes": self.peak_bytes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.experiences, self.importance, self.anchor = load_importance_state(state)
        self.peak_bytes = int(state["peak_bytes"])
