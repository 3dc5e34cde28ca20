"""Wise-FT (Wortsman et al. 2022): after each experience, interpolate the weights toward an anchor.

``θ ← (1 − α)·θ_anchor + α·θ`` with ``alpha`` in [0, 1] (0: back to the anchor, 1: the fine-tuned weights, no
change). The interpolation uses ``torch.lerp``, which is exact at both ends and leaves weights that did not
change bit-identical. ``anchor``:

* ``initial``: the weights when training starts (taken at ``before_training``; under ``lora(mode=merge)`` at the
  start of the first experience, once the fresh adapter, which starts at ``B = 0`` and so changes nothing, has
  shown which layers a merge can change);
* ``previous``: the weights before the current experience (taken at ``before_training_exp``), i.e. the model
  that the previous experience's Wise-FT produced.

The snapshot is a CPU copy of the parameters that can change, keyed by parameter name (``extra_memory_bytes``
is its size): the trainable parameters, and with ``lora(mode=merge)`` only the base weights of the adapted layers
(the only ones a merge changes).

**With LoRA.** Wise-FT interpolates the *effective* weights ``W + s·B·A`` of adapted layers, never the adapter
factors separately (interpolating A and B apart gives a product that is not the interpolation).

* ``lora(mode=merge)``: the kind order (parametrization before weights) merges the adapter before Wise-FT runs,
  so Wise-FT sees plain weights. With ``anchor=previous`` the anchor of an adapted layer is its effective weight at
  the start of the experience, stored under the merged model's parameter name.
* ``lora(mode=continue)`` (one adapter kept across tasks, base weights frozen) with ``anchor=initial``: the
  adapter starts at ``B = 0``, so ``θ_anchor = W0`` and ``θ = W0 + s·B·A``; the exact result
  ``W0 + α·s·B·A`` is a rank-r adapter again, obtained by scaling every ``lora_B`` by α in place (nothing is
  stored for the adapted layers). Training then continues from the scaled adapter.
* ``lora(mode=continue)`` with ``anchor=previous`` is refused when the spec is parsed: the result
  ``W0 + s·((1−α)·B_prev·A_prev + α·B·A)`` has rank up to 2r and no rank-r adapter holds it. Merging it into the
  base and restarting the adapter would silently turn ``continue`` into ``merge`` (base weights changing, a new
  adapter each task), so the run would not be what its spec says; use ``lora(mode=merge)+wiseft(anchor=previous)``
  or ``lora+wiseft`` (anchor=initial) instead. DoRA adapters are refused at run time (their weight is not
  linear in B).
"""
from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from clsuite.errors import UserError
from clsuite.memory import RunShape, State, lora_targets
from clsuite.strategy import Conflict, Params, Strategy, register

_PEFT_PREFIX = "base_model.model."


class WiseFTParams(Params):
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the fine-tuned model: (1-alpha)*anchor + alpha*theta")
    anchor: Literal["initial", "previous"] = Field(
        "initial", description="initial: weights before the first task; previous: weights before each task")


def canonical_name(name: str) -> str:
    """A parameter's name in the plain model: PEFT's wrapper prefix and ``.base_layer`` removed."""
    if name.startswith(_PEFT_PREFIX):
        name = name[len(_PEFT_PREFIX):]
    return name.replace(".base_layer.", ".")


def lora_layers(model: torch.nn.Module) -> list[tuple[str, Any]]:
    """(module name, layer) of every PEFT LoRA layer in ``model`` (none for a plain model)."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return []
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def _adapter_param_ids(layers: list[tuple[str, Any]]) -> set[int]:
    ids: set[int] = set()
    for _, layer in layers:
        for attr in layer.adapter_layer_names:
            ids.update(id(p) for p in getattr(layer, attr).parameters())
    return ids


def _b_factors(layer: Any) -> list[torch.Tensor]:
    """The B factors of a layer's active adapters (Linear/Conv: lora_B; Embedding: lora_embedding_B)."""
    out = []
    for a in layer.active_adapters:
        if getattr(layer, "use_dora", {}).get(a, False):
            raise UserError("wiseft cannot interpolate a DoRA adapter (its weight is not linear in B): "
                            "use plain LoRA")
        if a in layer.lora_B:
            out.append(layer.lora_B[a].weight)
        elif a in getattr(layer, "lora_embedding_B", {}):
            out.append(layer.lora_embedding_B[a])
    return out


def _effective_weight(layer: Any) -> torch.Tensor:
    """``W + Σ s·B·A`` over the active, unmerged adapters of one LoRA layer, as a CPU copy."""
    w = layer.get_base_layer().weight.detach().clone()
    if not layer.merged:
        for a in layer.active_adapters:
            if a in layer.lora_A or a in getattr(layer, "lora_embedding_A", {}):
                w += layer.get_delta_weight(a).to(w.dtype)
    return w.cpu()


@register("wiseft", aliases=("wise-ft",))
class WiseFT(Strategy):
    kind = "weights"
    description = "Wise-FT: after each task interpolate the weights toward the initial or previous weights"
    Params = WiseFTParams
    conflicts = (Conflict("lora", when={"mode": "continue"}, self_when={"anchor": "previous"},
                          reason="interpolating toward the previous task gives W0 + (1-alpha)*B_prev*A_prev + "
                                 "alpha*B*A, a rank-2r update that the kept rank-r adapter cannot hold; use "
                                 "lora(mode=merge)+wiseft(anchor=previous), or lora+wiseft(anchor=initial) (exact: "
                                 "the adapter's B is scaled by alpha)"),)

    def __init__(self, params: WiseFTParams | None = None):
        super().__init__(params)
        self.anchor: dict[str, torch.Tensor] = {}
        # True when the anchor of every LoRA layer is its frozen base weight (adapter at B = 0 when the
        # snapshot was taken): the weights are not stored, Wise-FT scales B instead.
        self.lora_implicit = False
        self._deferred = False  # anchor=initial under a parametrization: snapshot at the first experience
        self._peak_bytes = 0

    # --- snapshots -------------------------------------------------------------------------------
    def _changeable(self, model: torch.nn.Module, layers: list) -> dict[str, torch.nn.Parameter]:
        """Trainable parameters that are not adapter factors, by canonical name."""
        skip = _adapter_param_ids(layers)
        return {canonical_name(n): p for n, p in model.named_parameters() if p.requires_grad and id(p) not in skip}

    def _snapshot(self, model: torch.nn.Module, kept_adapter: bool) -> None:
        layers = lora_layers(model)
        anchor = {k: p.detach().to("cpu", copy=True) for k, p in self._changeable(model, layers).items()}
        self.lora_implicit = False
        if layers and kept_adapter:
            # An adapter kept from the start (lora mode=continue): its anchor is W0 = the frozen base weight.
            if any(bool(b.detach().any()) for _, layer in layers for b in _b_factors(layer)):
                raise UserError("wiseft(anchor=initial) needs the LoRA adapter to start at B = 0 (PEFT's default "
                                "initialisation), so that the initial effective weights are the base weights")
            self.lora_implicit = True
        elif layers:
            # A fresh adapter that will be merged after the experience: store the effective weights it changes.
            for n, layer in layers:
                anchor[canonical_name(n) + ".weight"] = _effective_weight(layer)
        self.anchor = anchor
        self._track()

    def _track(self) -> None:
        self._peak_bytes = max(self._peak_bytes, self.extra_bytes_now())

    def extra_bytes_now(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.anchor.values())

    # --- hooks -------------------------------------------------------------------------------------
    def before_training(self, ctx) -> None:
        self._deferred = False
        if self.params.anchor != "initial":
            return
        if lora_layers(ctx.model):
            self._snapshot(ctx.model, kept_adapter=True)  # lora(mode=continue) wrapped it: the adapter is kept
        elif any(p.kind == "parametrization" for p in ctx.plugins):
            # lora(mode=merge) wraps a fresh (B = 0) adapter in before_training_exp, which leaves the effective
            # weights unchanged; taking the snapshot then stores only the adapted layers' weights, the only
            # ones a merge can change, instead of a copy of the whole model.
            self._deferred = True
        else:
            self._snapshot(ctx.model, kept_adapter=False)

    def before_training_exp(self, ctx) -> None:
        if self.params.anchor == "previous" or self._deferred:
            self._deferred = False
            self._snapshot(ctx.model, kept_adapter=False)

    @torch.no_grad()
    def after_training_exp(self, ctx) -> None:
        alpha = float(self.params.alpha)
        layers = lora_layers(ctx.model)
        if layers:
            if not self.lora_implicit:
                raise RuntimeError("wiseft: the LoRA adapter was kept across the experience but the anchor is not its "
                                   "base weight; only lora(mode=continue)+wiseft(anchor=initial) or "
                                   "lora(mode=merge)+wiseft are supported")
            for _, layer in layers:
                for b in _b_factors(layer):
                    b.mul_(alpha)
        elif self.lora_implicit:
            raise RuntimeError("wiseft: the LoRA adapter was merged, but its initial weights were not stored")
        params = {canonical_name(n): p for n, p in ctx.model.named_parameters()}
        for k, start in self.anchor.items():
            if k not in params:
                raise RuntimeError(f"wiseft: parameter {k!r} of the anchor is not in the model")
            p = params[k]
            p.copy_(torch.lerp(start.to(device=p.device, dtype=p.dtype), p.detach(), alpha))

    # --- cost and state ----------------------------------------------------------------------------
    def memory_state(self, run: RunShape) -> list[State]:
        """A CPU snapshot of the trainable weights; under a merged adapter, of the adapted layers' weights; under a
        kept adapter (anchor=initial) nothing: B is scaled."""
        adapter = next((p for p in run.plugins if p.kind == "parametrization"), None)
        if adapter is None:
            return [State("snapshot of the weights", run.trainable, where="host")]
        if getattr(adapter.params, "mode", "merge") == "continue":
            return []
        adapted = sum(i * o for _, i, o in lora_targets(run.model, adapter.params.target_modules))
        return [State("snapshot of the adapted layers' weights", adapted, where="host")]

    def extra_memory_bytes(self) -> int:
        """Peak size of the snapshot (a CPU copy of the parameters that can change)."""
        return max(self._peak_bytes, self.extra_bytes_now())

    def state_dict(self) -> dict[str, Any]:
        return {"anchor": {k: v.clone() for k, v in self.anchor.items()}, "lora_implicit": self.lora_implicit,
                "deferred": self._deferred, "peak_bytes": self._peak_bytes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.anchor = {k: v.detach().to("cpu", copy=True) for k, v in state["anchor"].items()}
        self.lora_implicit = bool(state["lora_implicit"])
        self._deferred = bool(state.get("deferred", False))
        self._peak_bytes = int(state["peak_bytes"])  # the record's extra_memory_bytes, exact after a resume
        self._track()
