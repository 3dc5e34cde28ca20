"""Memory aware synapses (Aljundi et al. 2018): importance from the sensitivity of the output's squared norm, a
quadratic penalty towards the latest weights (docs/strategies.md)."""
from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from clsuite.memory import RunShape, State, quadratic_penalty
from clsuite.numerics import at_least_float32
from clsuite.strategies._anchored import (finished_task_rows, importance_state, load_importance_state,
                                          lora_merge_conflict, per_example_importance, quadratic_sum, seeded_sample,
                                          snapshot, tensor_bytes, warn_unmatched)
from clsuite.strategies.lwf import at_targets, forward_logits
from clsuite.strategy import Params, Strategy, register


class MASParams(Params):
    lam: float = Field(1.0, ge=0, alias="lambda", description="penalty strength (lambda · Σ Ω (θ − θ*)²)")
    samples: int = Field(64, ge=1, description="examples of each finished task used to estimate the importance")


def output_sq_norm(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """‖F(x)‖²₂ of a one-example batch: the squared logits summed over the vocabulary, averaged over its target
    positions (the positions ``lm_loss`` trains on)."""
    z, _ = at_targets(forward_logits(model, batch), batch["labels"])
    return z.to(at_least_float32(z.dtype)).pow(2).sum() / max(1, z.shape[0])


@register("mas")
class MAS(Strategy):
    """Ω_i = mean over N examples of |∂‖F(x)‖²/∂θ_i|, summed over finished tasks; penalty λ Σ Ω (θ − θ*)², θ* the
    weights after the latest finished task."""
    kind = "loss"
    description = "memory aware synapses: penalise moving weights the output's norm is sensitive to"
    Params = MASParams
    conflicts = (lora_merge_conflict(),)

    def __init__(self, params: MASParams | None = None):
        super().__init__(params)
        self.importance: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}
        self.experiences: list[int] = []
        self._warned = False

    def sample_indices(self, n: int, seed: int, experience: int) -> list[int]:
        """Which rows of the finished task feed Ω: seeded by run seed and experience, without replacement."""
        return seeded_sample(f"clsuite-mas-{seed}-{experience}", n, self.params.samples)

    def estimate(self, ctx: Any, rows: list[dict]) -> dict[str, torch.Tensor]:
        """Ω of ``rows``: the mean over examples of the absolute per-example gradient of ``output_sq_norm``. Each
        rank takes a strided share; the sums are all-reduced (as EWC's Fisher)."""
        return per_example_importance(ctx, rows, lambda row: output_sq_norm(ctx.model, ctx.collate([row])),
                                      torch.abs, "output norm while computing MAS's importance")

    # --- hooks -------------------------------------------------------------------------------------------
    def after_training_exp(self, ctx: Any) -> None:
        """Add the finished task's Ω (not after the last task: nothing later is penalised) and anchor the weights."""
        rows = finished_task_rows(ctx, self.sample_indices)
        if rows is None:
            return
        new = self.estimate(ctx, rows)
        for n, om in new.items():  # Ω accumulates over tasks; a name whose shape changed starts afresh
            old = self.importance.get(n)
            if old is not None and old.shape == om.shape:
                om.add_(old.to(device=om.device, dtype=om.dtype))
        self.importance = new
        self.anchor = snapshot(ctx.model)
        self.experiences.append(ctx.experience)

    def penalty(self, model: torch.nn.Module) -> torch.Tensor | None:
        """lambda · Σ_i Ω_i (θ_i − θ*_i)² over matching trainable parameters; None before the first finished task."""
        if not self.importance:
            return None
        total = quadratic_sum(model, [(self.importance, self.anchor)])
        if total is None:
            if not self._warned:
                warn_unmatched("mas")
                self._warned = True
            return None
        return self.params.lam * total

    def before_backward(self, ctx: Any) -> torch.Tensor | None:
        return None if self.params.lam == 0 else self.penalty(ctx.model)

    # --- cost and state ----------------------------------------------------------------------------------
    def memory_state(self, run: RunShape) -> list[State]:
        """After the first finished task (none with one task): Ω and the anchor."""
        if run.tasks < 2:
            return []
        return [State("importance", run.trainable, "fp32"), State("anchor", run.trainable),
                *quadratic_penalty(run, 1)]

    def extra_memory_bytes(self) -> int:
        """Ω (float32 at least) and the anchor (the parameters' dtype) of every trainable parameter."""
        return tensor_bytes(self.importance, self.anchor)

    def state_dict(self) -> dict[str, Any]:
        return importance_state(self.experiences, self.importance, self.anchor)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.experiences, self.importance, self.anchor = load_importance_state(state)
        self._warned = False
