"""A strategy's cost as measured time per optimizer step, on the stream's first task, strategies interleaved."""
from __future__ import annotations

import random
import statistics
import time
from typing import Any

from .config import RunConfig
from .engine import Context, set_seed, train_experience
from .models import load_model
from .strategy import build_strategy
from .streams import Stream


def time_one(stream: Stream, cfg: RunConfig, steps: int) -> float:
    """Seconds per step of ``cfg``'s strategy: ``steps`` steps of the first experience, plus its per-experience hooks
    (e.g. EWC's Fisher, Wise-FT's merge) spread over the experience's real number of steps."""
    real_steps = cfg.train.steps_for(len(stream.tasks[0].train))
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"steps": steps, "epochs": None})})
    set_seed(cfg.seed)
    model, tok = load_model(cfg.model)
    ctx = Context(model, tok, stream, cfg, build_strategy(cfg.strategy), random.Random(cfg.seed))
    ctx.call("before_training")
    ctx.experience, ctx.task = 0, stream.tasks[0]
    t0 = time.perf_counter()
    ctx.call("before_training_exp")
    hooks = time.perf_counter() - t0
    log = train_experience(ctx, progress=False)
    t0 = time.perf_counter()
    ctx.call("after_training_exp")
    hooks += time.perf_counter() - t0
    return log["train_seconds"] / steps + hooks / real_steps


def measure_costs(stream: Stream, configs: dict[str, RunConfig], steps: int = 20, repeats: int = 3
                  ) -> dict[str, dict[str, Any]]:
    """``{name: {"seconds_per_step": median, "spread": [min, max], "repeats": n}}``, each config timed ``repeats``
    times in rounds that visit every config once (so a slow spell of the machine touches all of them alike)."""
    times: dict[str, list[float]] = {n: [] for n in configs}
    time_one(stream, next(iter(configs.values())), 2)  # warm up: the model's first load and first steps
    for _ in range(repeats):
        for name, cfg in configs.items():
            times[name].append(time_one(stream, cfg, steps))
    return {n: {"seconds_per_step": statistics.median(t), "spread": [min(t), max(t)], "repeats": len(t)}
            for n, t in times.items()}
