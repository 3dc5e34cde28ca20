"""Cost and flatness of the efficient SAM variants against naive fine-tuning and SAM, in one interleaved run.

On tiny-synthetic's first task and model, every strategy trains the same steps on the same batches from the same
weights; rounds alternate the strategies so machine noise hits all alike. Printed per strategy: time per step
relative to naive (median over rounds), forward+backward passes per step, the share of SAM steps, the worst-case
sharpness (ρ = 0.05, the ``--sharpness`` measure) after training, and the share of SAM's sharpness reduction kept,
(naive − variant) / (naive − sam). Timings on a shared machine are noisy; the sharpness numbers are deterministic.

    python perf/efficient_sam.py [--steps 30] [--rounds 3] [--strategies naive,sam,looksam,sssam,aesam,msam]
"""
from __future__ import annotations

import argparse
import copy
import random
import statistics

import torch

from clsuite.config import resolve_config
from clsuite.engine import Context, train_experience
from clsuite.models import load_model
from clsuite.sharpness import measure_sharpness
from clsuite.strategy import build_strategy
from clsuite.streams import load_stream

WORST = "sharpness_worst"


def train(base: torch.nn.Module, tok, stream, spec: str, steps: int) -> tuple[float, Context]:
    """Train ``spec`` for ``steps`` steps on the stream's first task from a copy of ``base``: (seconds, ctx)."""
    cfg = resolve_config(stream, spec, 0, train={"steps": steps})
    ctx = Context(copy.deepcopy(base), tok, stream, cfg, build_strategy(spec), random.Random(0), experience=0,
                  task=stream.tasks[0])
    ctx.call("before_training")
    ctx.call("before_training_exp")
    seconds = train_experience(ctx, progress=False)["train_seconds"]
    ctx.call("after_training_exp")
    return seconds, ctx


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--strategies", default="naive,sam,looksam,sssam,aesam,msam")
    ap.add_argument("--examples", type=int, default=32, help="training rows the sharpness is measured on")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    specs = a.strategies.split(",")
    if "naive" not in specs or "sam" not in specs:
        raise SystemExit("--strategies must include naive and sam (the references of the ratios)")
    stream = load_stream("tiny-synthetic")
    base, tok = load_model(stream.model)
    train(base, tok, stream, "naive", 3)  # warm-up
    seconds: dict[str, list[float]] = {s: [] for s in specs}
    info: dict[str, dict] = {}
    for r in range(a.rounds):
        order = specs[r % len(specs):] + specs[:r % len(specs)]  # rotated, so no strategy always runs first
        for spec in order:
            t, ctx = train(base, tok, stream, spec, a.steps)
            seconds[spec].append(t / a.steps)
            if r == 0:  # the same weights every round (deterministic on the CPU): measure them once
                report = {k: v for p in ctx.plugins for k, v in p.cost_report().items()}
                info[spec] = {"passes": ctx.example_passes / (a.steps * ctx.config.train.batch_size),
                              "sam": report.get("sam_step_fraction", 0.0),
                              "worst": measure_sharpness(ctx, "cheap", a.examples)[WORST]}
    ms = {s: statistics.median(v) for s, v in seconds.items()}
    naive, sam = info["naive"]["worst"], info["sam"]["worst"]
    print(f"tiny-synthetic, task {stream.tasks[0].name}: {a.steps} steps x batch {ctx.config.train.batch_size}, "
          f"{a.rounds} interleaved rounds, {torch.get_num_threads()} thread(s); timings share the machine (noisy)")
    print(f"{'strategy':<10} {'ms/step':>8} {'time/naive':>10} {'passes':>7} {'SAM steps':>9} {'worst sharp.':>12} "
          f"{'share of SAM reduction':>23}")
    for s in specs:
        share = (naive - info[s]["worst"]) / (naive - sam) if naive != sam else float("nan")
        print(f"{s:<10} {ms[s] * 1e3:>8.1f} {ms[s] / ms['naive']:>10.2f} {info[s]['passes']:>7.2f} "
              f"{info[s]['sam']:>9.2f} {info[s]['worst']:>12.5f} {share:>23.2f}")
    print(f"(SAM's reduction of the worst-case sharpness: {naive - sam:+.5f}, {(naive - sam) / naive:+.1%} of naive's)")


if __name__ == "__main__":
    main()
