"""LoRA (Hu et al. 2022) through PEFT: train a low-rank adapter ``W + (alpha/r)·B·A`` instead of the weights.

Two modes:

* ``continue`` (default): one adapter is wrapped around the model in ``before_training`` and trained across all
  tasks; the base weights are never changed. After the run the model is still the PEFT model, so the record's
  ``trainable_parameters`` is the adapter size.
* ``merge``: a fresh adapter per experience (``before_training_exp``), merged into the base weights with
  ``merge_and_unload`` in ``after_training_exp`` (parametrization plugins run first, so Wise-FT interpolates,
  replay stores and EWC anchors the merged weights). After the merge the plain model is back, with the
  ``requires_grad`` flags it had before the wrap.

The adapter starts at ``B = 0`` (PEFT's default initialisation), so wrapping does not change the model's
function, and the base weights stay bit-identical until a merge. ``lora_dropout`` is active in training only:
the scorers put the model in eval mode. The optimizer is built per experience after ``before_training_exp``, over
``ctx.trainable_parameters()``, i.e. the adapter's A and B. ``target_modules`` names module suffixes (e.g.
``q_proj``) or ``all-linear`` (every linear layer but the output head). The adapter is part of the model, so
``extra_memory_bytes`` is 0 (the record's ``parameters`` counts it while it is attached).
"""
from __future__ import annotations

import warnings
from typing import Any, Literal

import torch
from pydantic import Field, field_validator

from clsuite.errors import UserError
from clsuite.memory import ModelShape, RunShape, State, Trainable, lora_targets
from clsuite.strategy import Params, Strategy, register


class AdapterParams(Params):
    """The adapter's shape, shared by lora and olora."""
    r: int = Field(8, ge=1, description="rank of the adapter")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha; the update is scaled by alpha / r")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter's input (training only)")
    target_modules: list[str] | Literal["all-linear"] = Field(
        ["q_proj", "v_proj"], description="module name suffixes to adapt, or all-linear")

    @field_validator("target_modules", mode="before")
    @classmethod
    def _targets(cls, v: Any) -> Any:
        if isinstance(v, str):
            return v if v == "all-linear" else [v]
        if isinstance(v, (list, tuple)) and list(v) == ["all-linear"]:
            return "all-linear"
        if isinstance(v, (list, tuple)) and not v:
            raise ValueError("name at least one module, e.g. [q_proj, v_proj], or all-linear")
        return v


class LoRAParams(AdapterParams):
    mode: Literal["continue", "merge"] = Field(
        "continue", description="continue: one adapter for all tasks; merge: a new adapter per task, merged after it")


def _linear_names(model: torch.nn.Module) -> list[str]:
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n})


@register("lora")
class LoRA(Strategy):
    kind = "parametrization"
    description = "LoRA adapter (PEFT): continue one adapter across tasks, or merge a fresh one after each task"
    Params = LoRAParams

    def __init__(self, params: LoRAParams | None = None):
        super().__init__(params)
        self.peft_model: Any = None  # the PEFT model while an adapter is attached
        self._flags: dict[str, bool] = {}  # requires_grad of the base parameters before the wrap
        self._pending: dict[str, torch.Tensor] | None = None  # adapter weights from load_state_dict
        self.merges = 0

    def config(self):
        from peft import LoraConfig
        p = self.params
        targets = p.target_modules if isinstance(p.target_modules, str) else list(p.target_modules)
        return LoraConfig(r=p.r, lora_alpha=p.alpha, lora_dropout=p.dropout, target_modules=targets,
                          bias="none", task_type="CAUSAL_LM")

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """Attach a fresh adapter (B = 0); the base weights are frozen, not changed."""
        from peft import get_peft_model
        self._flags = {n: p.requires_grad for n, p in model.named_parameters()}
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
                peft_model = get_peft_model(model, self.config())
        except ValueError as e:
            raise UserError(f"lora(target_modules={self.params.target_modules}): {str(e).splitlines()[0]} "
                            f"(linear modules of this model: {', '.join(_linear_names(model))}; or all-linear)") from None
        peft_model.train(model.training)
        self.peft_model = peft_model
        if self._pending is not None:
            self._load_adapter(self._pending)
            self._pending = None
        return peft_model

    def unwrap(self, peft_model: torch.nn.Module) -> torch.nn.Module:
        """Merge the adapter into the base weights and return the plain model (flags as before the wrap)."""
        base = peft_model.merge_and_unload()
        for n, p in base.named_parameters():
            p.requires_grad_(self._flags.get(n, True))
        self.peft_model = None
        self.merges += 1
        return base

    # --- hooks -------------------------------------------------------------------------------------
    def before_training(self, ctx) -> None:
        if self.params.mode == "continue":
            ctx.model = self.wrap(ctx.model)

    def before_training_exp(self, ctx) -> None:
        if self.params.mode == "merge":
            ctx.model = self.wrap(ctx.model)

    def after_training_exp(self, ctx) -> None:
        if self.params.mode == "merge":
            ctx.model = self.unwrap(ctx.model)

    # --- cost and state ----------------------------------------------------------------------------
    def memory_trainable(self, shape: ModelShape) -> Trainable:
        """The adapter's A and B (PEFT keeps them in float32 on a bfloat16 model); the base weights are frozen."""
        return Trainable(sum(self.params.r * (i + o) for _, i, o in lora_targets(shape, self.params.target_modules)),
                         "fp32")

    def memory_state(self, run: RunShape) -> list[State]:
        return [State("adapter weights", run.trainable, "fp32")]

    def adapter_state(self) -> dict[str, torch.Tensor]:
        if self.peft_model is None:
            return {}
        return {n: p.detach().to("cpu", copy=True) for n, p in self.peft_model.named_parameters() if ".lora_" in n}

    def _load_adapter(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.peft_model.named_parameters())
        with torch.no_grad():
            for n, t in state.items():
                if n not in params:
                    raise ValueError(f"lora: adapter parameter {n!r} is not in the model")
                params[n].copy_(t)

    def state_dict(self) -> dict[str, Any]:
        return {"adapter": self.adapter_state(), "merges": self.merges}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.merges = int(state.get("merges", 0))
        adapter = state.get("adapter") or {}
        if self.peft_model is not None and adapter:
            self._load_adapter(adapter)
        else:
            self._pending = adapter or None
