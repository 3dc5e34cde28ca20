"""Planned against measured memory: ``clsuite.memory.plan_memory``'s peak against the peak of live tensor bytes
(``clsuite.memory.TensorPeak``, the CPU's counterpart of torch.cuda.max_memory_allocated) while the engine trains the
second experience of a two-task stream, one process on the CPU.

    flock /tmp/clsuite-heavy.lock python perf/memory_plan.py                 # tiny-synthetic-base and SmolLM2-135M
    python perf/memory_plan.py --streams tiny-synthetic --steps 2            # the tiny model only (seconds)
    python perf/memory_plan.py --streams smollm2-bbc --cases 4,5,6           # some of CASES (indices) only

The plan is given the widest batch the run met (``tokens``) and the most logit positions (``head_positions``), so the
error is the formula's, not that of max_length's upper bound; the plan at max_length is printed beside it. The
process's peak RSS growth over the experience is printed for reference: it is not tensor memory alone (allocator
caches, freed memory not returned).
"""
from __future__ import annotations

import argparse
import dataclasses
import random
import time

import torch

from clsuite.config import resolve_config
from clsuite.engine import Context, set_seed, train_experience
from clsuite.memory import TensorPeak, measured_peak, plan_memory, prepare_model, reset_peak, shape_of
from clsuite.models import load_model
from clsuite.strategy import build_strategy
from clsuite.streams import load_stream

CASES = [("naive", {}), ("sam", {}), ("sam+ewc(samples=4)", {}), ("naive", {"precision": "bf16"}),
         ("naive", {"precision": "bf16-weights"}),
         ("naive", {"activation_checkpointing": True}), ("sam", {"precision": "bf16-weights",
                                                                "activation_checkpointing": True})]
MIB = 2 ** 20


def two_tasks(name: str):
    """The stream with two tasks: its first two, or its one task twice (under another name)."""
    s = load_stream(name)
    first = s.tasks[0]
    second = s.tasks[1] if len(s.tasks) > 1 else dataclasses.replace(first, name=first.name + "_again")
    return dataclasses.replace(s, tasks=[first, second], orders=None)


def batch_sizes(ctx: Context) -> tuple[list[int], list[int]]:
    """Record the width and the logit positions of every batch ``ctx.collate`` makes from now on."""
    widths, heads = [], []
    real = ctx.collate

    def collate(examples):
        b = real(examples)
        labels = b["labels"][:, 1:]
        targets = labels != -100
        first = int(targets.any(0).nonzero()[0]) if targets.any() else 0
        widths.append(b["input_ids"].shape[1])
        heads.append(labels.shape[1] + 1 - first if first else b["input_ids"].shape[1])
        return b

    ctx.collate = collate
    return widths, heads


def measure(stream, spec: str, train: dict, steps: int, batch_size: int | None) -> dict:
    """Train experience 0, then measure experience 1 (EWC holds its first Fisher then); the plan beside it."""
    train = {**train, **({"batch_size": batch_size} if batch_size else {})}
    cfg = resolve_config(stream, spec, 0, train={**train, "steps": steps, "epochs": None})
    set_seed(0)
    model, tok = load_model(cfg.model)
    prepare_model(model, cfg.train)
    shape = shape_of(model, cfg.model, "loaded")
    ctx = Context(model, tok, stream, cfg, build_strategy(cfg.strategy), random.Random(0))
    ctx.call("before_training")
    for ctx.experience, ctx.task in enumerate(stream.tasks):
        ctx.call("before_training_exp")
        if ctx.experience == 0:
            train_experience(ctx, progress=False)
        else:
            widths, heads = batch_sizes(ctx)
            tp = TensorPeak()
            tp.track([*model.parameters(), *model.buffers(), *[s for p in ctx.plugins for s in _tensors(p)]])
            rss0 = _rss()
            reset_peak(torch.device("cpu"))
            t0 = time.perf_counter()
            with tp:
                train_experience(ctx, progress=False)
            seconds = time.perf_counter() - t0
            rss = measured_peak(torch.device("cpu"))[1] - rss0
        ctx.call("after_training_exp")
    kw = dict(tasks=2, general=stream.general is not None, device="cpu")
    plan = plan_memory(shape, cfg.train, spec, tokens=max(widths), head_positions=max(heads), **kw)
    bound = plan_memory(shape, cfg.train, spec, **kw)
    every = ("device", "host")
    return {"model": cfg.model, "spec": spec, "settings": ",".join(f"{k}={v}" for k, v in train.items()) or "-",
            "tokens": f"{cfg.train.batch_size}x{max(widths)} ({max(heads)})", "measured": tp.peak,
            "planned": plan.peak(every), "bound": bound.peak(every), "rss": rss, "seconds": seconds,
            "moment": plan.peak_moment(every),
            "unknown": len(plan.unknown())}


def _tensors(plugin) -> list[torch.Tensor]:
    """The tensors a plugin's state_dict holds (EWC's Fisher and anchors, ...)."""
    out = []

    def walk(x):
        if isinstance(x, torch.Tensor):
            out.append(x)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
    walk(plugin.state_dict())
    return out


def _rss() -> int:
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS:")).split()[1]) * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", default="tiny-synthetic,smollm2-bbc")
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per experience")
    ap.add_argument("--batch-size", type=int, default=None, help="instead of the stream's batch_size")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cases", default=None, help="comma-separated indices into CASES (default: all)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cases = [CASES[int(i)] for i in args.cases.split(",")] if args.cases else CASES
    rows = []
    for name in args.streams.split(","):
        stream = two_tasks(name)
        for spec, train in cases:
            r = measure(stream, spec, train, args.steps, args.batch_size)
            rows.append(r)
            print(f"{r['model']:20s} {r['spec']:20s} {r['settings']:52s} batch {r['tokens']:12s} measured "
                  f"{r['measured'] / MIB:8.1f} MiB  planned {r['planned'] / MIB:8.1f} MiB "
                  f"({100 * (r['planned'] / r['measured'] - 1):+5.1f}%, at the {r['moment']})  "
                  f"at max_length {r['bound'] / MIB:8.1f} MiB  "
                  f"RSS growth {r['rss'] / MIB:8.1f} MiB  {r['seconds']:.0f} s", flush=True)
    errs = [abs(r["planned"] / r["measured"] - 1) for r in rows]
    print(f"\nplanner error against the measured tensor peak: mean |error| {100 * sum(errs) / len(errs):.1f}%, "
          f"largest {100 * max(errs):.1f}% over {len(rows)} cases")


if __name__ == "__main__":
    main()
