"""The continual-learning loop: train on each experience in turn, evaluate every task and probe after each
(design: docs/engine.md)."""
from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from . import distributed as dist
from . import sharding
from . import memory
from .config import RunConfig, TrainConfig
from .data import collate, lm_loss
from .errors import DivergenceError, UserError
from .scoring import score
from .sharpness import measure_sharpness
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
    master: memory.MasterWeights | None = None  # precision=bf16-weights: the fp32 copies the optimizer steps
    scheduler: Any = None
    step: int = 0
    total_steps: int = 0  # optimizer steps of the current experience (TrainConfig.steps_for its train rows)
    batch: dict[str, torch.Tensor] | None = None  # the micro-batch being processed (for batch-dependent loss terms)
    example_passes: int = 0  # examples through a forward+backward pass, all plugins' extra work included

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        """A training batch, in the format the current task is scored in (its chat, BOS and delimiter settings)."""
        if self.task is None:
            return collate(self.tokenizer, examples, self.stream.chat, self.config.train.max_length)
        return collate(self.tokenizer, examples, self.task.chat, self.config.train.max_length,
                       **self.task.conventions())

    def loss(self, examples: list[dict], reduction: str = "mean") -> torch.Tensor:
        """The task loss of ``examples`` under the current model (used by plugins, e.g. EWC's Fisher)."""
        return lm_loss(self.model, self.collate(examples), reduction)

    def base_step(self) -> None:
        """Let every plugin change the gradient now in ``.grad`` (``before_update``, in kind order), clip it and step
        the base optimizer."""
        self.call("before_update")
        with self.master.stepping() if self.master is not None else contextlib.nullcontext():  # in fp32 there
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
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **({"fused": True} if memory.fused(cls) else {}))


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        frac = (step - cfg.warmup_steps) / max(1, steps - cfg.warmup_steps)
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


def make_closure(ctx: Context, micro: list[dict[str, torch.Tensor]], examples: list[dict],
                 params: list[torch.nn.Parameter]) -> Callable[[], torch.Tensor]:
    """The objective of one optimizer step: gradients of the task loss plus every plugin's term over the fixed
    micro-batches ``micro`` (of ``examples``) left in ``.grad``; returns the loss. An update rule may call it twice."""
    cfg = ctx.config.train

    def closure() -> torch.Tensor:
        ctx.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros(())
        for ctx.batch in micro:
            with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=memory.autocast_enabled(cfg)):
                loss = lm_loss(ctx.model, ctx.batch)
                for p in ctx.plugins:
                    term = p.before_backward(ctx)
                    if term is not None:
                        loss = loss + term
            (loss / len(micro)).backward()
            total += loss.detach().cpu() / len(micro)
        ctx.example_passes += len(examples)
        # every pass (SAM's two included) leaves the gradient averaged over ranks in .grad
        return dist.average_gradients(params, total)

    return closure


def train_experience(ctx: Context, progress: bool = True) -> dict[str, Any]:
    """Train the current experience; returns its timing, token count and loss curve."""
    cfg = ctx.config.train
    update = next((p for p in ctx.plugins if p.kind == "update"), None)
    data = ctx.task.train
    for p in ctx.plugins:
        data = p.train_dataset_adaptation(ctx, data)
    ctx.train_data = data
    dist.check_batch(cfg.batch_size, cfg.grad_accum, len(data))
    dist.broadcast_model(ctx.model)  # ranks start the experience identical (a parametrization may add weights)
    params = ctx.trainable_parameters()
    ctx.master = memory.MasterWeights(params) if cfg.precision == "bf16-weights" else None
    ctx.optimizer = make_optimizer(params, cfg)
    ctx.total_steps = cfg.steps_for(len(ctx.task.train))  # epochs count the task's own rows, not a plugin's
    ctx.scheduler = make_scheduler(ctx.optimizer, cfg, ctx.total_steps)
    gen = torch.Generator().manual_seed(ctx.config.seed * 1000 + ctx.experience)
    batches = _batches(data, cfg.batch_size, gen)
    tokens, losses, start = 0, [], time.perf_counter()
    memory.reset_peak(ctx.device)
    ctx.model.train()
    bar = tqdm(range(ctx.total_steps), desc=f"  train {ctx.task.name}", leave=False, disable=not progress, unit="step")
    for ctx.step in bar:
        examples = next(batches)
        for p in ctx.plugins:
            examples = p.before_training_iteration(ctx, examples)
        # data plugins saw the global batch (identical on every rank); each rank trains on its shard
        micro = [ctx.collate(chunk) for chunk in _split(dist.shard(examples), cfg.grad_accum)]
        tokens += sum(int(b["attention_mask"].sum()) for b in micro)
        closure = make_closure(ctx, micro, examples, params)
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
    tokens = dist.total(tokens)
    ctx.master = None
    return {"task": ctx.task.name, "steps": ctx.total_steps, "tokens": tokens,
            "train_seconds": time.perf_counter() - start, **memory.peak_per_process(ctx.device, cfg),
            "trainable_parameters": sum(p.numel() for p in params),
            "first_loss": losses[0], "final_loss": float(np.mean(losses[-max(1, len(losses) // 10):])),
            "loss_curve": losses[:: max(1, len(losses) // 50)]}


def evaluate(ctx: Context, tasks: list[Task], progress: bool = False) -> dict[str, dict[str, float]]:
    """Score every task's eval split with its scorer."""
    ecfg = ctx.config.eval
    out = {}
    for t in tqdm(tasks, desc="  evaluate", unit="task", leave=False, disable=not progress):
        if t.lm_eval is not None:  # lm-evaluation-harness on the in-memory model (clsuite.lm_eval_probe)
            out[t.name] = t.lm_eval.score(ctx.model, ctx.tokenizer, ecfg.batch_size, ecfg.max_examples)
            continue
        rows = t.eval if ecfg.max_examples is None else t.eval.select(range(min(len(t.eval), ecfg.max_examples)))
        out[t.name] = score(t.scorer, ctx.model, ctx.tokenizer, list(rows), t.chat, ecfg.max_length,
                            ecfg.batch_size, **t.conventions())
    return out


@dataclass
class RunHooks:
    """What the caller adds around the loop (all optional).
    ``initial``: row 0 already evaluated on these very weights (``clsuite.evalcache``), used instead of evaluating;
    ``on_row(i, row)``: after each row evaluated here; ``after_experience(result)``: at the end of each experience
    with the rows and logs so far (checkpoints); ``restore(ctx)``: resumes a run: called after ``before_training``
    instead of evaluating row 0, it loads a checkpoint into ``ctx`` and returns its rows and logs."""
    initial: dict[str, Any] | None = None
    on_row: Callable[[int, dict], None] | None = None
    after_experience: Callable[[dict[str, Any]], None] | None = None
    restore: Callable[[Context], dict[str, Any]] | None = None


def run_stream(ctx: Context, progress: bool = True, hooks: RunHooks | None = None) -> dict[str, Any]:
    """Evaluate the initial model, then train and evaluate each experience; returns matrices and per-experience logs."""
    hooks = hooks or RunHooks()
    stream = ctx.stream
    rows, experiences = [], []

    def add_row(cached: dict[str, Any] | None = None) -> None:
        if sharding.sharded(ctx.config):  # a sharded model's forward passes need every rank: all evaluate alike
            dist.everywhere(lambda: evaluate_row(dist.broadcast_json(cached)))
            return
        # evaluation is rank 0's alone (it writes the record); the others wait, and its failure reaches them
        dist.on_main(lambda: evaluate_row(cached))

    def evaluate_row(cached: dict[str, Any] | None) -> None:
        if experiences and ctx.config.eval.sharpness != "off":  # after an experience, of the weights evaluated
            t0 = time.perf_counter()
            experiences[-1]["sharpness"] = measure_sharpness(ctx, ctx.config.eval.sharpness,
                                                             ctx.config.eval.sharpness_examples)
            experiences[-1]["sharpness_seconds"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        rows.append(cached or {"tasks": evaluate(ctx, stream.tasks, progress),
                               "probes": evaluate(ctx, stream.probes, progress)})
        bad = [n for part in rows[-1].values() for n, r in part.items() if not math.isfinite(r["score"])]
        if bad:  # NaN weights can give NaN scores before any NaN loss is seen (e.g. a huge step)
            raise DivergenceError(f"non-finite score on {', '.join(bad)} after {len(rows) - 1} experience(s): "
                                  "the weights diverged; lower the learning rate or the strategy's step size")
        if experiences:
            experiences[-1]["eval_seconds"] = time.perf_counter() - t0
        if hooks.on_row and cached is None:
            hooks.on_row(len(rows) - 1, rows[-1])

    early = sharding.shard_model(ctx)  # parallel=fsdp: a parametrization wraps the whole model, then it is sharded
    if hooks.restore is None:
        add_row(hooks.initial)
    for p in ctx.plugins:  # also on resume: a parametrization wraps the model here, then state is loaded
        if p not in early:
            p.before_training(ctx)
    if hooks.restore is not None:
        done = hooks.restore(ctx)
        rows.extend(done["rows"])
        experiences.extend(done["experiences"])
    for ctx.experience, ctx.task in enumerate(tqdm(stream.tasks, desc=f"{ctx.config.strategy} seed {ctx.config.seed}",
                                                   disable=not progress, unit="task")):
        if ctx.experience < len(experiences):  # trained before the restored checkpoint
            continue
        t0 = time.perf_counter()
        ctx.call("before_training_exp")
        hooks_seconds = time.perf_counter() - t0
        experiences.append(train_experience(ctx, progress))
        t0 = time.perf_counter()
        ctx.call("after_training_exp")  # e.g. EWC's Fisher, Wise-FT's merge: part of a strategy's cost
        experiences[-1]["hook_seconds"] = hooks_seconds + time.perf_counter() - t0
        add_row()  # of the weights after merges / Wise-FT, with their sharpness
        if hooks.after_experience:
            hooks.after_experience({"rows": rows, "experiences": experiences})
    ctx.call("after_training")
    return {"rows": rows, "experiences": experiences}
