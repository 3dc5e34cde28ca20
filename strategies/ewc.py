"""Elastic weight consolidation (Kirkpatrick et al. 2017) and online EWC (Schwarz et al. 2018): a diagonal
empirical Fisher of per-example gradients and an anchor per finished task (docs/ewc.md)."""
from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from clsuite import sharding
from clsuite.errors import UserError
from clsuite.memory import RunShape, State, quadratic_penalty
from clsuite.strategies._anchored import (FRESH_ADAPTER, finished_task_rows, lora_merge_conflict,
                                          per_example_importance, quadratic_sum, seeded_sample, snapshot,
                                          tensor_bytes, warn_unmatched)
from clsuite.strategy import Params, Strategy, register


class EWCParams(Params):
    lam: float = Field(100.0, ge=0, alias="lambda", description="penalty strength (lambda/2 · Σ F (θ − θ*)²)")
    samples: int = Field(64, ge=1, description="examples of each finished task used to estimate the Fisher")
    mode: Literal["separate", "online"] = Field(
        "separate", description="separate: one (Fisher, anchor) per task; online: one decayed Fisher, latest anchor")
    gamma: float = Field(1.0, ge=0, le=1, description="online mode: F <- gamma * F_old + F_new")
    general: int = Field(0, ge=0, description="examples of the stream's general data for a Fisher taken before the "
                                              "first experience, anchored at the initial weights (0: none)")


@register("ewc")
class EWC(Strategy):
    kind = "loss"
    description = "elastic weight consolidation: a diagonal-Fisher quadratic penalty towards earlier tasks' weights"
    Params = EWCParams
    conflicts = (lora_merge_conflict(FRESH_ADAPTER + ", where EWC anchors the adapter's factors"),)

    def __init__(self, params: EWCParams | None = None):
        super().__init__(params)
        # One entry per stored experience (online mode: at most one); each maps parameter name -> tensor.
        self.fishers: list[dict[str, torch.Tensor]] = []
        self.anchors: list[dict[str, torch.Tensor]] = []
        self.experiences: list[int] = []
        self._warned = False

    # --- Fisher and anchor --------------------------------------------------------------------------------
    def sample_indices(self, n: int, seed: int, experience: int) -> list[int]:
        """Which rows of the finished task feed the Fisher: seeded, without replacement, in drawn order."""
        return seeded_sample(f"clsuite-ewc-{seed}-{experience}", n, self.params.samples)

    def fisher(self, ctx: Any, rows: list[dict]) -> dict[str, torch.Tensor]:
        """Empirical diagonal Fisher: mean over ``rows`` of the squared per-example gradient of ``ctx.loss``.

        Under data parallelism each rank takes a strided share of ``rows`` and the sums are all-reduced, so every
        rank holds the same Fisher (the one process's, up to the order of the sum). Under FSDP each rank holds its
        shard of it, the per-example gradients squared before they are summed over ranks."""
        objective, what = (lambda row: ctx.loss([row])), "loss while computing EWC's Fisher"
        if sharding.is_sharded_model(ctx.model):
            return sharding.mean_squared_gradients(ctx, rows, objective, what)
        return per_example_importance(ctx, rows, objective, lambda g: g.pow(2), what)

    def before_training(self, ctx: Any) -> None:
        """With ``general``: protect what the initial model knows, as if its general data were a task learned."""
        if not self.params.general:
            return
        data = ctx.stream.general
        if data is None or len(data) == 0:
            raise UserError(f"ewc(general={self.params.general}) needs general data, but stream {ctx.stream.name!r} "
                            "has none: add 'general_data: {source: ...}' to the stream file or use ewc(general=0)")
        idx = seeded_sample(f"clsuite-ewc-{ctx.config.seed}-general", len(data), self.params.general)
        self._store(ctx, self.fisher(ctx, [data[i] for i in idx]), -1)

    def after_training_exp(self, ctx: Any) -> None:
        rows = finished_task_rows(ctx, self.sample_indices)
        if rows is not None:
            self._store(ctx, self.fisher(ctx, rows), ctx.experience)

    def _store(self, ctx: Any, new_f: dict[str, torch.Tensor], experience: int) -> None:
        anchor = snapshot(ctx.model)
        if self.params.mode == "online":
            if self.fishers:  # F <- gamma * F_old + F_new; a name whose shape changed starts afresh
                old = self.fishers[0]
                for n, f in new_f.items():
                    if n in old and old[n].shape == f.shape:
                        f.add_(old[n].to(device=f.device, dtype=f.dtype), alpha=self.params.gamma)
            self.fishers, self.anchors, self.experiences = [new_f], [anchor], [experience]
        else:
            self.fishers.append(new_f)
            self.anchors.append(anchor)
            self.experiences.append(experience)

    # --- the penalty ----------------------------------------------------------------------------------------
    def penalty(self, model: torch.nn.Module) -> torch.Tensor | None:
        """(lambda/2) Σ_t Σ_i F_t,i (θ_i − θ*_t,i)² over matching trainable parameters; None if nothing is stored."""
        if not self.fishers:
            return None
        total = quadratic_sum(model, zip(self.fishers, self.anchors))  # sharded: the whole sum's value
        if total is None:
            if not self._warned:
                warn_unmatched("ewc")
                self._warned = True
            return None
        return 0.5 * self.params.lam * total

    def before_backward(self, ctx: Any) -> torch.Tensor | None:
        if self.params.lam == 0:
            return None
        return self.penalty(ctx.model)

    # --- cost and state ---------------------------------------------------------------------------------------
    def memory_state(self, run: RunShape) -> list[State]:
        """A Fisher and an anchor per finished task but the last (online: one pair), and the general one."""
        general = int(bool(self.params.general and run.general))
        pairs = run.tasks - 1 + general if self.params.mode == "separate" else int(run.tasks > 1 or bool(general))
        return [State(f"Fisher ({pairs})", pairs * run.trainable, "fp32"),
                State(f"anchors ({pairs})", pairs * run.trainable), *quadratic_penalty(run, pairs)]

    def extra_memory_bytes(self) -> int:
        """Bytes of every stored Fisher and anchor."""
        return tensor_bytes(*self.fishers, *self.anchors)

    def state_dict(self) -> dict[str, Any]:
        """``{"mode", "experiences": [int], "fisher": [{name: tensor}], "anchor": [{name: tensor}]}``."""
        return {"mode": self.params.mode, "experiences": list(self.experiences),
                "fisher": [dict(f) for f in self.fishers], "anchor": [dict(a) for a in self.anchors]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("mode", self.params.mode) != self.params.mode:
            raise ValueError(f"ewc state was saved in mode {state['mode']!r}, this plugin runs {self.params.mode!r}")
        fishers, anchors = list(state.get("fisher", [])), list(state.get("anchor", []))
        if len(fishers) != len(anchors):
            raise ValueError(f"ewc state has {len(fishers)} Fisher entries but {len(anchors)} anchors")
        self.fishers = [dict(f) for f in fishers]
        self.anchors = [dict(a) for a in anchors]
        self.experiences = list(state.get("experiences", range(len(fishers))))
        self._warned = False
