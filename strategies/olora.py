"""O-LoRA (Wang et al. 2023): a fresh LoRA adapter per task, merged after it, trained with an L1 penalty that keeps
its A orthogonal to the earlier tasks' A (docs/strategies.md)."""
from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from clsuite.memory import RunShape, State, lora_targets
from clsuite.numerics import at_least_float32
from clsuite.strategies._anchored import tensor_bytes
from clsuite.strategies.lora import AdapterParams, LoRA
from clsuite.strategies.wiseft import canonical_name, lora_layers
from clsuite.strategy import Conflict, register

NO_ANCHOR = ("each task trains a fresh adapter that no stored anchor or starting point refers to, so the penalty "
             "cannot apply; use olora alone (its orthogonality term protects earlier tasks), or the penalty with "
             "lora (mode=continue)")


class OLoRAParams(AdapterParams):
    """Each task's adapter (as lora's) and the weights of O-LoRA's two terms."""
    lambda_1: float = Field(0.5, ge=0, description="weight of the orthogonality term sum_i sum_modules |A_i A_t^T|")
    lambda_2: float = Field(0.0, ge=0, description="weight of the L2 term ||theta_t||^2 on the new adapter's A and B")


def adapter_a(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Module name in the plain model -> the A factor (r × in) of its active adapter, for every LoRA layer."""
    out = {}
    for name, layer in lora_layers(model):
        for a in layer.active_adapters:
            if a in layer.lora_A:
                out[canonical_name(name)] = layer.lora_A[a].weight.flatten(1)
            elif a in getattr(layer, "lora_embedding_A", {}):
                out[canonical_name(name)] = layer.lora_embedding_A[a]
    return out


def orthogonality(stored: dict[str, torch.Tensor], current: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """Σ_modules Σ |S A_tᵀ| (entrywise L1), S the earlier tasks' A stacked by rows: Σ_i Σ_modules |A_i A_tᵀ|.sum().
    None if nothing is stored."""
    total = None
    for m, s in stored.items():
        a = current.get(m)
        if a is None:
            raise RuntimeError(f"olora: module {m!r} has stored A factors but no adapter in the model")
        dt = at_least_float32(a.dtype)
        with torch.autocast(a.device.type, enabled=False):  # an L1 of products: not in bf16
            term = (s.to(device=a.device, dtype=dt) @ a.to(dt).T).abs().sum()
        total = term if total is None else total + term.to(total.device)
    return total


@register("olora")
class OLoRA(LoRA):
    """A fresh adapter per experience (as ``lora(mode=merge)``); its A factors are stored before the merge, and
    later adapters pay ``lambda_1 · Σ_i Σ_modules |A_i A_tᵀ|.sum() + lambda_2 · ‖θ_t‖²``."""
    kind = "parametrization"
    description = ("O-LoRA: a fresh LoRA adapter per task, merged after it, with an L1 penalty on its A's products "
                   "with the earlier tasks' A (orthogonal subspaces)")
    Params = OLoRAParams
    conflicts = tuple(Conflict(n, reason=NO_ANCHOR) for n in ("ewc", "mas", "si", "l2sp"))

    def __init__(self, params: OLoRAParams | None = None):
        super().__init__(params)
        self.stored: dict[str, torch.Tensor] = {}  # module -> the finished tasks' A factors, stacked by rows
        self.experiences: list[int] = []  # the experiences whose A factors are stored, in order
        self._current: dict[str, torch.Tensor] = {}  # the new adapter's A factors while it is attached

    # --- hooks -------------------------------------------------------------------------------------
    def before_training(self, ctx: Any) -> None:
        """Nothing: the adapter is attached per experience."""

    def before_training_exp(self, ctx: Any) -> None:
        ctx.model = self.wrap(ctx.model)
        self._current = adapter_a(ctx.model)

    def after_training_exp(self, ctx: Any) -> None:
        """Store the adapter's A (not after the last task: nothing later is penalised), then merge it."""
        last = ctx.stream is not None and ctx.experience == len(ctx.stream.tasks) - 1
        if not last:
            for m, a in self._current.items():
                new = a.detach().clone()
                self.stored[m] = torch.cat([self.stored[m], new.to(self.stored[m])]) if m in self.stored else new
            self.experiences.append(ctx.experience)
        self._current = {}
        ctx.model = self.unwrap(ctx.model)

    # --- the penalty ---------------------------------------------------------------------------------
    def penalty(self) -> torch.Tensor | None:
        """lambda_1 · Σ_i Σ_modules |A_i A_tᵀ|.sum() + lambda_2 · Σ ‖p‖² over the new adapter's A and B; None if
        no adapter is attached or both terms are off."""
        if self.peft_model is None:
            return None
        p, total = self.params, None
        if p.lambda_1 and self.stored:
            total = p.lambda_1 * orthogonality(self.stored, self._current)
        if p.lambda_2:
            new = [q for n, q in self.peft_model.named_parameters() if ".lora_" in n and q.requires_grad]
            l2 = p.lambda_2 * sum(q.to(at_least_float32(q.dtype)).pow(2).sum() for q in new)
            total = l2 if total is None else total + l2
        return total

    def before_backward(self, ctx: Any) -> torch.Tensor | None:
        return self.penalty()

    # --- cost and state ----------------------------------------------------------------------------
    def memory_state(self, run: RunShape) -> list[State]:
        """The adapter, and the A factors (r × in) of every finished task but the last."""
        a = sum(self.params.r * i for _, i, _ in lora_targets(run.model, self.params.target_modules))
        return super().memory_state(run) + [State("earlier tasks' A factors", max(0, run.tasks - 1) * a, "fp32")]

    def extra_memory_bytes(self) -> int:
        """Bytes of the stored A factors."""
        return tensor_bytes(self.stored)

    def state_dict(self) -> dict[str, Any]:
        """``{"experiences": [int], "A": {module: tensor (rows: r per stored experience)}}``."""
        return {"experiences": list(self.experiences), "A": dict(self.stored)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        stored, experiences = dict(state.get("A", {})), list(state.get("experiences", []))
        bad = [m for m, a in stored.items() if a.shape[0] != self.params.r * len(experiences)]
        if bad:
            raise ValueError(f"olora state holds A factors of {bad[0]!r} with {stored[bad[0]].shape[0]} rows, not "
                             f"r={self.params.r} per stored experience ({len(experiences)})")
        self.stored, self.experiences = stored, experiences
