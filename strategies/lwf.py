"""Learning without Forgetting (Li & Hoiem 2017): distil the previous experience's model into the current one on
the current data, at the target tokens (docs/strategies.md)."""
from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field

from clsuite import distributed
from clsuite.data import forward_logits
from clsuite.memory import RunShape, State
from clsuite.numerics import at_least_float32
from clsuite.strategy import Params, Strategy, register


def at_targets(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of raw logits ``(B, K, V)`` that predict a target token (label not -100), as in ``lm_loss``:
    ``(rows (N, V), example index of each row (N,))``."""
    labels = labels[:, 1:][:, labels.shape[1] - logits.shape[1]:].to(logits.device)
    mask = labels != -100
    return logits[:, :-1][mask], mask.nonzero()[:, 0]


def per_example_mean(values: torch.Tensor, example: torch.Tensor, n: int) -> torch.Tensor:
    """Mean over examples of each example's mean over its rows (0 for an example without rows), like ``lm_loss``."""
    sums = torch.zeros(n, dtype=values.dtype, device=values.device).index_add_(0, example, values)
    counts = torch.bincount(example, minlength=n).clamp(min=1).to(values.dtype)
    return (sums / counts).mean()


class LwFParams(Params):
    lam: float = Field(1.0, ge=0, alias="lambda", description="weight of the distillation term (Li & Hoiem: 1)")
    temperature: float = Field(2.0, gt=0, description="softmax temperature T (Li & Hoiem: 2)")


@register("lwf")
class LwF(Strategy):
    """``lambda · T² · KL(softmax(z_old/T) ‖ softmax(z/T))`` at the target tokens, z_old from a frozen copy of the
    model as the previous experience left it (no term in the first experience)."""
    kind = "loss"
    description = "learning without forgetting: distil the previous experience's model on the current data"
    Params = LwFParams
    # Held during an experience only (deleted after it, rebuilt from the weights before the next): class defaults.
    teacher: torch.nn.Module | None = None
    _hook: Any = None
    _student: tuple[torch.Tensor, torch.Tensor] | None = None  # (input ids, logits) of the closure's forward
    _cache: list[tuple[dict, torch.Tensor]] | None = None  # (micro-batch, teacher log-probs at its targets)
    _cache_step: int = -1

    def __init__(self, params: LwFParams | None = None):
        super().__init__(params)
        self.counts = {"teacher_bytes": 0, "cache_bytes": 0, "teacher_examples": 0, "trained_examples": 0}

    # --- hooks -------------------------------------------------------------------------------------------
    def before_training_exp(self, ctx: Any) -> None:
        """From the second experience on: the teacher is a frozen copy of the weights now, before any step of this
        experience, i.e. as the previous one left them (after merges and Wise-FT; on resume, the restored ones)."""
        if ctx.experience == 0 or self.params.lam == 0:
            return
        self.teacher = copy.deepcopy(ctx.model).eval().requires_grad_(False)
        size = sum(t.numel() * t.element_size() for t in [*self.teacher.parameters(), *self.teacher.buffers()])
        self.counts["teacher_bytes"] = max(self.counts["teacher_bytes"], size)

        def keep_student_logits(module: Any, args: tuple, kwargs: dict, out: Any) -> None:
            ids = kwargs.get("input_ids", args[0] if args else None)
            b = ctx.batch
            if (torch.is_grad_enabled() and b is not None and ids is not None and ids.shape == b["input_ids"].shape
                    and torch.equal(ids, b["input_ids"].to(ids.device))):
                self._student = (b["input_ids"], out.logits)

        # the closure's forward of each micro-batch gives the student's logits: no second student forward
        self._hook = ctx.model.register_forward_hook(keep_student_logits, with_kwargs=True)

    def before_training_iteration(self, ctx: Any, examples: list[dict]) -> list[dict]:
        self.counts["trained_examples"] += len(examples)
        return examples

    def before_backward(self, ctx: Any) -> torch.Tensor | None:
        if self.teacher is None:
            return None
        student, self._student = self._student, None
        if student is None or student[0] is not ctx.batch["input_ids"]:
            raise RuntimeError("lwf: the engine's forward of the current micro-batch was not seen; LwF reads the "
                               "student's logits from it (strategies/lwf.py)")
        t = self.params.temperature
        z, example = at_targets(student[1], ctx.batch["labels"])
        log_p = F.log_softmax(z.to(at_least_float32(z.dtype)) / t, dim=-1)
        kl = F.kl_div(log_p, self.teacher_log_probs(ctx), log_target=True, reduction="none").sum(-1)
        return self.params.lam * t * t * per_example_mean(kl, example, len(ctx.batch["input_ids"]))

    def teacher_log_probs(self, ctx: Any) -> torch.Tensor:
        """log softmax(z_old/T) at the targets of ``ctx.batch``, computed once per micro-batch of a step (SAM's
        second pass reuses it: the teacher does not move)."""
        if self._cache is None or self._cache_step != ctx.step:
            self._cache, self._cache_step = [], ctx.step
        for batch, log_q in self._cache:
            if batch is ctx.batch:
                return log_q
        with torch.no_grad():
            z_old, _ = at_targets(forward_logits(self.teacher, ctx.batch), ctx.batch["labels"])
            log_q = F.log_softmax(z_old.to(at_least_float32(z_old.dtype)) / self.params.temperature, dim=-1)
        self._cache.append((ctx.batch, log_q))
        self.counts["teacher_examples"] += len(ctx.batch["input_ids"]) * distributed.world_size()
        held = sum(q.numel() * q.element_size() for _, q in self._cache)
        self.counts["cache_bytes"] = max(self.counts["cache_bytes"], held)
        return log_q

    def after_training_exp(self, ctx: Any) -> None:
        if self._hook is not None:
            self._hook.remove()
        for name in ("teacher", "_hook", "_student", "_cache", "_cache_step"):
            vars(self).pop(name, None)

    # --- cost and state ----------------------------------------------------------------------------------
    def memory_state(self, run: RunShape) -> list[State]:
        """From the second experience on: the teacher and one step's teacher log-probabilities."""
        if run.tasks < 2:
            return []
        step = run.micro_batch * run.micro_batches * run.head_positions * run.model.vocab
        return [State("teacher copy of the model", run.model.parameters),
                State("teacher log-probabilities of a step", step, "fp32", sharded=False)]

    def extra_memory_bytes(self) -> int:
        """The teacher copy (parameters and buffers) and the largest step's cached teacher log-probabilities."""
        return self.counts["teacher_bytes"] + self.counts["cache_bytes"]

    def cost_report(self) -> dict[str, float]:
        """``teacher_forward_multiplier``: examples through the teacher's forward (no backward) per example
        trained; not in ``compute_multiplier``, which counts forward+backward passes."""
        trained = self.counts["trained_examples"]
        return {"teacher_forward_multiplier": self.counts["teacher_examples"] / trained} if trained else {}

    def state_dict(self) -> dict[str, Any]:
        """The cost counters; the teacher is rebuilt from the restored weights before the next experience."""
        return dict(self.counts)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.counts = {k: int(state.get(k, 0)) for k in self.counts}
