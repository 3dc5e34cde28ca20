"""The continual-learning loop: train on each experience in turn, evaluate every task and probe after each.

Strategy hooks are called in kind order (see ``clsuite.strategy``). The training objective of one optimizer
step is a closure over fixed micro-batches, so an update rule such as SAM can re-evaluate the *whole*
objective (task loss, every plugin's loss term, replayed examples) at perturbed weights.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import RunConfig, TrainConfig
from .data import collate, lm_loss
from .errors import DivergenceError, UserError
from .scoring import score
from .strategy import Strategy
from .streams import Stream, Task


@dataclass
class Context:
    """What hooks see and may change: the model (a parametrization may replace it), data, optimizer, counters."""
    model: torch.nn.Module
    tokenizer: Any
    stream: Stream
    config: RunConfig
    plugins: list[Strategy]
    rng: random.Random
    experience: int = -1
    task: Task | None = None
    train_data: Any = None
    optimizer: torch.optim.Optimizer | None = None
    scheduler: Any = None
    step: int = 0
    batch: dict[str, torch.Tensor] | None = None  # the micro-batch being processed (for batch-dependent loss terms)
    example_passes: int = 0  # examples through a forward+backward pass, all plugins' extra work included
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        chat = self.task.chat if self.task is not None else self.stream.chat
        return collate(self.tokenizer, examples, chat, self.config.train.max_length)

    def loss(self, examples: list[dict], reduction: str = "mean") -> torch.Tensor:
        """The task loss of ``examples`` under the current model (used by plugins, e.g. EWC's Fisher)."""
        return lm_loss(self.model, self.collate(examples), reduction)

    def base_step(self) -> None:
        """Clip the gradients now in ``.grad`` and step the base optimizer."""
        if self.config.train.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.trainable_parameters(), self.config.train.max_grad_norm)
        self.optimizer.step()

    def call(self, hook: str, *args: Any) -> None:
        for p in self.plugins:
            getattr(p, hook)(self, *args)


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    cls = getattr(torch.optim, cfg.optimizer, None)
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise UserError(f"unknown optimizer {cfg.optimizer!r}: use a torch.optim class name such as AdamW or SGD")
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return {"constant": 1.0, "linear": 1.0 - frac, "cosine": 0.5 * (1 + math.cos(math.pi * frac))}[cfg.schedule]
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _batches(data: Any, batch_size: int, gen: torch.Generator):
    """Endless shuffled batches of rows (reshuffled each epoch, seeded)."""
    n = len(data)
    while True:
        order = torch.randperm(n, generator=gen).tolist()
        for i in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
            yield [data[j] for j in order[i:i + batch_size]]


def _split(items: list, n: int) -> list[list]:
    """``n`` contiguous chunks of near-equal size (fewer when there are fewer items)."""
    n = min(n, len(items))
    k, m = divmod(len(items), n)
    bounds = [i * k + min(i, m) for i in range(n + 1)]
    return [items[bounds[i]:bounds[i + 1]] for i in range(n)]


def train_experience(ctx: Context, progress: bool = True) -> dict[str, Any]:
    """Train the current experience; returns its timing, token count and loss curve."""
    cfg = ctx.config.train
    update = next((p for p in ctx.plugins if p.kind == "update"), None)
    data = ctx.task.train
    for p in ctx.plugins:
        data = p.train_dataset_adaptation(ctx, data)
    ctx.train_data = data
    params = ctx.trainable_parameters()
    ctx.optimizer = make_optimizer(params, cfg)
    ctx.scheduler = make_scheduler(ctx.optimizer, cfg)
    gen = torch.Generator().manual_seed(ctx.config.seed * 1000 + ctx.experience)
    batches = _batches(data, cfg.batch_size, gen)
    tokens, losses, start = 0, [], time.perf_counter()
    ctx.model.train()
    bar = tqdm(range(cfg.steps), desc=f"  train {ctx.task.name}", leave=False, disable=not progress, unit="step")
    for ctx.step in bar:
        examples = next(batches)
        for p in ctx.plugins:
            examples = p.before_training_iteration(ctx, examples)
        micro = [ctx.collate(chunk) for chunk in _split(examples, cfg.grad_accum)]
        tokens += sum(int(b["attention_mask"].sum()) for b in micro)

        def closure() -> torch.Tensor:
            ctx.optimizer.zero_grad(set_to_none=True)
            total = torch.zeros(())
            for ctx.batch in micro:
                loss = lm_loss(ctx.model, ctx.batch)
                for p in ctx.plugins:
                    term = p.before_backward(ctx)
                    if term is not None:
                        loss = loss + term
                (loss / len(micro)).backward()
                total += loss.detach().cpu() / len(micro)
            ctx.example_passes += len(examples)
            return total

        if update is None:
            loss = closure()
            ctx.base_step()
        else:
            loss = update.optimizer_step(ctx, closure)
        value = float(loss)
        if not math.isfinite(value):
            raise DivergenceError(f"non-finite loss {value} at step {ctx.step} of task {ctx.task.name!r}; "
                                  "lower the learning rate or the strategy's step size (e.g. SAM's rho)")
        ctx.scheduler.step()
        losses.append(value)
        if ctx.step % 10 == 0:
            bar.set_postfix(loss=f"{value:.3f}")
    return {"task": ctx.task.name, "steps": cfg.steps, "tokens": tokens, "train_seconds": time.perf_counter() - start,
            "trainable_parameters": sum(p.numel() for p in params),
            "first_loss": losses[0], "final_loss": float(np.mean(losses[-max(1, len(losses) // 10):])),
            "loss_curve": losses[:: max(1, len(losses) // 50)]}


def evaluate(ctx: Context, tasks: list[Task]) -> dict[str, dict[str, float]]:
    """Score every task's eval split with its scorer."""
    ecfg = ctx.config.eval
    out = {}
    for t in tasks:
        rows = t.eval if ecfg.max_examples is None else t.eval.select(range(min(len(t.eval), ecfg.max_examples)))
        out[t.name] = score(t.scorer, ctx.model, ctx.tokenizer, list(rows), t.chat, ecfg.max_length,
                            ecfg.batch_size)
    return out


def run_stream(ctx: Context, progress: bool = True, on_row: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Evaluate the initial model, then train and evaluate each experience; returns matrices and per-experience logs."""
    stream = ctx.stream
    rows, experiences = [], []

    def add_row() -> None:
        t0 = time.perf_counter()
        rows.append({"tasks": evaluate(ctx, stream.tasks), "probes": evaluate(ctx, stream.probes)})
        if experiences:
            experiences[-1]["eval_seconds"] = time.perf_counter() - t0
        if on_row:
            on_row(len(rows) - 1)

    add_row()
    ctx.call("before_training")
    for ctx.experience, ctx.task in enumerate(tqdm(stream.tasks, desc=f"{ctx.config.strategy} seed {ctx.config.seed}",
                                                   disable=not progress, unit="task")):
        ctx.call("before_training_exp")
        experiences.append(train_experience(ctx, progress))
        ctx.call("after_training_exp")
        if ctx.config.eval.sharpness != "off":  # the weights that are evaluated (after merges / Wise-FT)
            from .landscape import measure_sharpness
            t0 = time.perf_counter()
            experiences[-1]["sharpness"] = measure_sharpness(ctx, ctx.config.eval.sharpness,
                                                             ctx.config.eval.sharpness_examples)
            experiences[-1]["sharpness_seconds"] = time.perf_counter() - t0
        add_row()
    ctx.call("after_training")
    return {"rows": rows, "experiences": experiences}
