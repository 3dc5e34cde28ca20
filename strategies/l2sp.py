"""L2-SP (Li et al. 2018): an L2 pull towards the starting point, the weights before the first experience
(docs/strategies.md)."""
from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from clsuite.errors import UserError
from clsuite.memory import RunShape, State, quadratic_penalty
from clsuite.numerics import at_least_float32
from clsuite.strategies._anchored import lora_merge_conflict, snapshot, tensor_bytes, trainable
from clsuite.strategy import Params, Strategy, register


class L2SPParams(Params):
    alpha: float = Field(0.1, ge=0, description="penalty strength (alpha/2 · ‖θ − θ₀‖²)")


@register("l2sp")
class L2SP(Strategy):
    """``alpha/2 · ‖θ − θ₀‖²`` over the trainable parameters, θ₀ their values at ``before_training``."""
    kind = "loss"
    description = "L2-SP: an L2 penalty towards the initial (pretrained) weights"
    Params = L2SPParams
    conflicts = (lora_merge_conflict("the starting point is taken before the first task, when no adapter exists, so "
                                     "each task's fresh adapter has none; use lora (mode=continue), where "
                                     "L2-SP pulls the adapter towards its start"),)

    def __init__(self, params: L2SPParams | None = None):
        super().__init__(params)
        self.anchor: dict[str, torch.Tensor] = {}

    def before_training(self, ctx: Any) -> None:
        self.anchor = snapshot(ctx.model)

    def penalty(self, model: torch.nn.Module) -> torch.Tensor | None:
        """alpha/2 · Σ (θ − θ₀)² over the trainable parameters (all of them anchored)."""
        total = None
        for n, p in trainable(model).items():
            a = self.anchor.get(n)
            if a is None or a.shape != p.shape:
                raise UserError(f"l2sp: trainable parameter {n!r} has no starting point of its shape (a "
                                "parametrization added or renamed weights after training started); drop l2sp or "
                                "the parametrization")
            dt = at_least_float32(p.dtype)
            term = (p.to(dt) - a.to(dt)).pow(2).sum()
            total = term if total is None else total + term.to(total.device)
        return None if total is None else 0.5 * self.params.alpha * total

    def before_backward(self, ctx: Any) -> torch.Tensor | None:
        return None if self.params.alpha == 0 else self.penalty(ctx.model)

    def memory_state(self, run: RunShape) -> list[State]:
        return [State("starting point", run.trainable), *quadratic_penalty(run, 1, "θ − θ₀")]

    def extra_memory_bytes(self) -> int:
        """The starting point: one copy of the trainable parameters."""
        return tensor_bytes(self.anchor)

    def state_dict(self) -> dict[str, Any]:
        """θ₀, so that a resumed run pulls towards the same point as the uninterrupted one."""
        return {"anchor": dict(self.anchor)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.anchor = dict(state["anchor"])
