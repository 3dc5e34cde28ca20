"""Elastic weight consolidation (Kirkpatrick et al. 2017) and online EWC (Schwarz et al. 2018).

After each experience the plugin stores, for every trainable parameter (by name):

* the anchor ``θ*``: the weights as they are after the experience (after any adapter merge or Wise-FT
  interpolation, which run earlier in the kind order);
* the empirical diagonal Fisher ``F_i = (1/N) Σ_n (∂ℓ_n/∂θ_i)²`` over ``N = min(samples, len(train))``
  examples of the finished task's training split, drawn without replacement with a generator seeded from the
  run's seed and the experience index (the plugin never draws from ``ctx.rng``, so it does not shift other
  plugins' random streams).

``ℓ_n`` is the engine's per-example training loss, ``ctx.loss([x_n])``: the *mean* negative log-likelihood of
the target tokens of example n. The textbook Fisher uses the sequence log-likelihood (the sum over tokens);
ours is that sum divided by the target length, which weights each example as training does and puts the
penalty in the units of the task loss: ``½ Σ F (θ − θ*)²`` approximates the increase of the old task's
training loss (its Hessian approximated by the empirical Fisher), so ``lambda = 1`` means "count the old
task like the new one". F is not otherwise normalised (no division by its maximum or mean), so ``lambda``
is *not* scale-free across models and tasks: gradients, hence F, shrink as a task is fitted.

The penalty, added to the objective at every pass (SAM's second pass included), is

    separate mode:  (lambda/2) Σ_t Σ_i F_{t,i} (θ_i − θ*_{t,i})²      one (F, θ*) per finished experience
    online mode:    (lambda/2) Σ_i F_i (θ_i − θ*_i)²                  F ← gamma·F + F_new, θ* ← latest weights

Parameters are matched by name (``ctx.model.named_parameters()``; tied weights appear once). A stored name
that is absent from the current model, no longer trainable, or of another shape is skipped in the penalty (a
warning says so once when *no* stored name matches, e.g. when a parametrization renames the weights); in
online mode a name whose shape changed starts a fresh Fisher.

Cost. Time: ``samples`` extra forward+backward passes (batch size 1) per experience, added to
``ctx.example_passes``; the penalty itself is a few element-wise operations over the trainable parameters
per micro-batch. Memory: the Fisher (float32, or the parameters' dtype when wider) and the anchor (the
parameters' dtype) of every trainable parameter, i.e. 2 × trainable parameters × 4 bytes for a float32 model,
per stored experience in separate mode (T experiences: T times that), once in online mode. Both live on the
parameters' device.
"""
from __future__ import annotations

import random
import warnings
from typing import Any, Literal

import torch
from pydantic import Field

from clsuite import distributed
from clsuite.errors import DivergenceError, UserError
from clsuite.strategy import Params, Strategy, register


class EWCParams(Params):
    lam: float = Field(100.0, ge=0, alias="lambda", description="penalty strength (lambda/2 · Σ F (θ − θ*)²)")
    samples: int = Field(64, ge=1, description="examples of each finished task used to estimate the Fisher")
    mode: Literal["separate", "online"] = Field(
        "separate", description="separate: one (Fisher, anchor) per task; online: one decayed Fisher, latest anchor")
    gamma: float = Field(1.0, ge=0, le=1, description="online mode: F <- gamma * F_old + F_new")
    general: int = Field(0, ge=0, description="examples of the stream's general data for a Fisher taken before the "
                                              "first experience, anchored at the initial weights (0: none)")


def _wide(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision parameters (sums of squares overflow or lose precision), else their dtype."""
    return torch.promote_types(dtype, torch.float32)


@register("ewc")
class EWC(Strategy):
    kind = "loss"
    description = "elastic weight consolidation: a diagonal-Fisher quadratic penalty towards earlier tasks' weights"
    Params = EWCParams

    def __init__(self, params: EWCParams | None = None):
        super().__init__(params)
        # One entry per stored experience (online mode: at most one); each maps parameter name -> tensor.
        self.fishers: list[dict[str, torch.Tensor]] = []
        self.anchors: list[dict[str, torch.Tensor]] = []
        self.experiences: list[int] = []
        self._warned = False

    def conflict(self, others: list[Strategy]) -> str | None:
        for o in others:
            if o.name == "lora" and getattr(o.params, "mode", None) == "merge":
                return ("ewc cannot be combined with lora(mode=merge): each task trains a fresh adapter that starts "
                        "at zero, so no stored anchor refers to its weights and the penalty would do nothing; use "
                        "lora (mode=continue), where EWC anchors the adapter's factors")
        return super().conflict(others)

    # --- Fisher and anchor --------------------------------------------------------------------------------
    @staticmethod
    def _trainable(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in model.named_parameters() if p.requires_grad}

    def sample_indices(self, n: int, seed: int, experience: int) -> list[int]:
        """Which rows of the finished task feed the Fisher: seeded, without replacement, in drawn order."""
        return random.Random(f"clsuite-ewc-{seed}-{experience}").sample(range(n), min(self.params.samples, n))

    def fisher(self, ctx: Any, rows: list[dict]) -> dict[str, torch.Tensor]:
        """Empirical diagonal Fisher: mean over ``rows`` of the squared per-example gradient of ``ctx.loss``.

        Under data parallelism each rank takes a strided share of ``rows`` and the sums are all-reduced, so every
        rank holds the same Fisher (the one process's, up to the order of the sum)."""
        params = self._trainable(ctx.model)
        names, tensors = list(params), list(params.values())
        acc = {n: torch.zeros_like(p, dtype=_wide(p.dtype)) for n, p in params.items()}
        was_training = ctx.model.training
        ctx.model.eval()  # no dropout noise in the per-example gradients
        bad = torch.zeros(())  # non-finite losses met; summed over ranks with the Fisher, so all ranks raise
        try:
            for row in distributed.shard(rows):
                loss = ctx.loss([row])
                if not torch.isfinite(loss):
                    bad += 1
                    break
                grads = torch.autograd.grad(loss, tensors, allow_unused=True)
                for n, g in zip(names, grads):
                    if g is not None:
                        acc[n].add_(g.detach().to(acc[n].dtype).pow(2))
        finally:
            ctx.model.train(was_training)
        distributed.all_reduce_sum_(list(acc.values()) + [bad])
        if bad:
            raise DivergenceError(f"non-finite loss while computing EWC's Fisher on task "
                                  f"{getattr(ctx.task, 'name', '?')!r}")
        ctx.example_passes += len(rows)
        return {n: a.div_(max(1, len(rows))) for n, a in acc.items()}

    def before_training(self, ctx: Any) -> None:
        """With ``general``: protect what the initial model knows, as if its general data were a task learned."""
        if not self.params.general:
            return
        data = ctx.stream.general
        if data is None or len(data) == 0:
            raise UserError(f"ewc(general={self.params.general}) needs general data, but stream {ctx.stream.name!r} "
                            "has none: add 'general_data: {source: ...}' to the stream file or use ewc(general=0)")
        idx = random.Random(f"clsuite-ewc-{ctx.config.seed}-general").sample(
            range(len(data)), min(self.params.general, len(data)))
        self._store(ctx, self.fisher(ctx, [data[i] for i in idx]), -1)

    def after_training_exp(self, ctx: Any) -> None:
        data = ctx.task.train if ctx.task is not None else None
        last = ctx.stream is not None and ctx.experience == len(ctx.stream.tasks) - 1
        if data is None or len(data) == 0 or last:
            return  # after the last experience no later task would be penalised
        rows = [data[i] for i in self.sample_indices(len(data), ctx.config.seed, ctx.experience)]
        self._store(ctx, self.fisher(ctx, rows), ctx.experience)

    def _store(self, ctx: Any, new_f: dict[str, torch.Tensor], experience: int) -> None:
        anchor = {n: p.detach().clone() for n, p in self._trainable(ctx.model).items()}
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
        params = self._trainable(model)
        total = None
        for fisher, anchor in zip(self.fishers, self.anchors):
            for n, f in fisher.items():
                p = params.get(n)
                if p is None or p.shape != f.shape or n not in anchor:
                    continue
                dt = _wide(p.dtype)
                term = (f.to(dt) * (p.to(dt) - anchor[n].to(dt)).pow(2)).sum()
                total = term if total is None else total + term.to(total.device)
        if total is None:
            if not self._warned:
                warnings.warn("ewc: no stored parameter name matches a trainable parameter of the current model "
                              "(renamed by a parametrization?); the penalty is zero", RuntimeWarning, stacklevel=2)
                self._warned = True
            return None
        return 0.5 * self.params.lam * total

    def before_backward(self, ctx: Any) -> torch.Tensor | None:
        if self.params.lam == 0:
            return None
        return self.penalty(ctx.model)

    # --- cost and state ---------------------------------------------------------------------------------------
    def extra_memory_bytes(self) -> int:
        """Bytes of every stored Fisher and anchor."""
        return sum(t.numel() * t.element_size() for d in self.fishers + self.anchors for t in d.values())

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
