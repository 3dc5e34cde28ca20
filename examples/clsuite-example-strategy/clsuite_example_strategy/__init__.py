"""An example clsuite strategy plugin: an L2 penalty toward the initial weights (kind "loss").

    objective = task loss + weight/2 · Σ_i (θ_i − θ0_i)²

``θ0`` is a copy of the trainable parameters taken in ``before_training`` (on their device), matched by name;
a parameter that is absent from the anchor (e.g. one a parametrization added later), or whose shape changed,
is not penalised. The term is returned from ``before_backward``, so the engine adds it at every pass (SAM's
second pass included).
"""
from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from clsuite.strategy import Params, Strategy, register

__all__ = ["L2Anchor", "L2Params"]


class L2Params(Params):
    weight: float = Field(0.01, ge=0, description="penalty strength: weight/2 * ||theta - theta_0||^2")


@register("l2")
class L2Anchor(Strategy):
    kind = "loss"
    description = "L2 pull toward the initial weights, weight/2 * ||theta - theta_0||^2 (example plugin)"
    Params = L2Params

    def __init__(self, params: L2Params | None = None):
        super().__init__(params)
        self.anchor: dict[str, torch.Tensor] = {}

    def before_training(self, ctx) -> None:
        self.anchor = {n: p.detach().clone() for n, p in ctx.model.named_parameters() if p.requires_grad}

    def before_backward(self, ctx) -> torch.Tensor | None:
        if not self.anchor or self.params.weight == 0:
            return None
        terms = []
        for n, p in ctx.model.named_parameters():
            a = self.anchor.get(n)
            if a is None or not p.requires_grad or a.shape != p.shape:
                continue
            if a.device != p.device:  # e.g. after load_state_dict
                a = self.anchor[n] = a.to(p.device)
            terms.append((p - a).pow(2).sum())
        return 0.5 * self.params.weight * sum(terms[1:], terms[0]) if terms else None

    def extra_memory_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.anchor.values())

    def state_dict(self) -> dict[str, Any]:
        return {"anchor": {n: t.detach().cpu() for n, t in self.anchor.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.anchor = {n: t.detach().clone() for n, t in state["anchor"].items()}
