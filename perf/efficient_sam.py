"""Cost and kept sharpness reduction of the efficient SAM variants against naive fine-tuning and SAM, on one stream.

One round per seed: every strategy trains the whole stream (its tasks, steps, batches and data order for that seed)
from the same base weights, in an order rotated by the seed, timed; then the worst-case sharpness of its final
weights is measured on the last task's first ``sharpness_examples`` training rows (the stream's setting) with
clsuite.sharpness's radius and ascent steps (rho = 0.05, one step). Printed per strategy: time per step over naive's in
the same round, passes per step, the share of SAM steps, its plain-kind and SAM-kind steps over a naive step, the final
sharpness and the loss on the rows it is measured on, the kept reduction (S_naive - S_variant) / (S_naive - S_sam) per
seed and of the means (docs/efficient-sam.md), and whether each variant meets issue 13's target. Ratios: median (min
to max over rounds or seeds).

    python perf/efficient_sam.py --stream tiny-synthetic --seeds 0,1,2 \
        [--strategies 'naive,sam,looksam(k=6),sssam(p=0.25)'] [--json out.json] [--steps N] [--threads 1]
    python perf/efficient_sam.py --merge seed0.json seed1.json   # one table from jobs run one seed at a time
    python perf/efficient_sam.py --stream smollm2-bbc --overhead   # LookSAM's tensor work alone, at the model's shapes
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clsuite.config import resolve_config
from clsuite.data import lm_loss
from clsuite.engine import Context, set_seed, train_experience
from clsuite.flatness import worst_case_sharpness
from clsuite.models import load_model
from clsuite.sharpness import ASCENT_STEPS, RHO, first_rows
from clsuite.spec import split_specs
from clsuite.stats import paired_test
from clsuite.strategy import Strategy, build_strategy
from clsuite.streams import Stream, in_order, load_stream

DEFAULT_STRATEGIES = "naive,sam,looksam,sssam,aesam,msam"
COST_TARGET, KEPT_TARGET = 1.3, 0.8  # issue 13: at most 1.3x a plain step, at least 80% of SAM's reduction kept


class StepClock(Strategy):
    """A hook-only plugin that times every optimizer step and notes whether the update rule took a SAM step in it."""
    kind = "base"

    def __init__(self) -> None:
        super().__init__()
        self.marks: list[tuple[float, int]] = []  # (time, the update rule's SAM steps so far) at each step's start
        self.steps: list[tuple[float, bool]] = []  # (seconds, SAM step?) per optimizer step

    @staticmethod
    def _sam_count(ctx: Any) -> int:
        return sum(getattr(p, "sam_steps", 0) for p in ctx.plugins)

    def before_training_iteration(self, ctx: Any, examples: list[dict]) -> list[dict]:
        self._mark(ctx)
        return examples

    def after_training_exp(self, ctx: Any) -> None:
        self._mark(ctx)
        self.marks = []

    def _mark(self, ctx: Any) -> None:
        now = (time.perf_counter(), self._sam_count(ctx))
        if self.marks:
            (t0, n0) = self.marks[-1]
            self.steps.append((now[0] - t0, now[1] > n0))
        self.marks.append(now)


def train_stream(base: torch.nn.Module, tok: Any, stream: Stream, spec: str, seed: int,
                 steps: int | None) -> dict[str, Any]:
    """Train ``spec`` over the whole stream from a copy of ``base`` as a run of ``seed`` does (no evaluation); its
    time, passes, SAM-step share, per-step times, final training loss and the final weights' worst-case sharpness."""
    stream = in_order(stream, seed)
    cfg = resolve_config(stream, spec, seed, train={"steps": steps} if steps else None)
    set_seed(seed)
    clock = StepClock()
    plugins = build_strategy(spec)
    ctx = Context(copy.deepcopy(base), tok, stream, cfg, [*plugins, clock], random.Random(seed))
    ctx.call("before_training")
    seconds, n_steps = 0.0, 0
    worst, loss = [], []  # after each experience, of the weights it ends with, on its task's rows
    for ctx.experience, ctx.task in enumerate(stream.tasks):
        ctx.call("before_training_exp")
        out = train_experience(ctx, progress=False)
        ctx.call("after_training_exp")
        seconds, n_steps = seconds + out["train_seconds"], n_steps + out["steps"]
        w, v = sharpness_and_loss(ctx)
        worst.append(w)
        loss.append(v)
    ctx.call("after_training")
    report = {k: v for p in plugins for k, v in p.cost_report().items()}
    plain = [s for s, sam in clock.steps if not sam]
    sam = [s for s, sam in clock.steps if sam]
    return {"spec": spec, "seed": seed, "seconds": seconds, "steps": n_steps,
            "passes": ctx.example_passes / (n_steps * cfg.train.batch_size),
            "sam_fraction": report.get("sam_step_fraction", 0.0),
            "plain_step": statistics.median(plain) if plain else None,
            "sam_step": statistics.median(sam) if sam else None,
            "worst": worst[-1], "loss": loss[-1], "worst_by_experience": worst, "loss_by_experience": loss}


def sharpness_and_loss(ctx: Context) -> tuple[float, float]:
    """The ``sharpness_worst`` scalar of clsuite.sharpness (its rho and ascent steps, on the first
    ``sharpness_examples`` train rows of the task, the stream's setting) without the Hessian trace measured beside it,
    and the loss on those rows at the same weights."""
    batch = ctx.collate(first_rows(ctx.task.train, ctx.config.eval.sharpness_examples))
    worst = worst_case_sharpness(ctx.model, lambda: lm_loss(ctx.model, batch), ctx.trainable_parameters(), rho=RHO,
                                 steps=ASCENT_STEPS, seed=0, disable_progress=True)
    with torch.no_grad():
        loss = float(lm_loss(ctx.model, batch))
    return worst, loss


def kept_reduction(naive: float, sam: float, variant: float) -> float:
    """(naive - variant) / (naive - sam): 1 keeps all of SAM's reduction of the sharpness, 0 none; NaN when SAM's
    reduction is 0."""
    return (naive - variant) / (naive - sam) if naive != sam else float("nan")


def kept_interval(naive: list[float], sam: list[float], variant: list[float], level: float = 0.9,
                  resamples: int = 2000) -> tuple[float, float]:
    """Percentile interval of the kept reduction of the means, seeds resampled with replacement (seeded)."""
    rng = np.random.default_rng(0)
    a, b, c = (np.asarray(x, dtype=float) for x in (naive, sam, variant))
    idx = rng.integers(0, len(a), size=(resamples, len(a)))
    den, num = (a[idx] - b[idx]).mean(1), (a[idx] - c[idx]).mean(1)
    ratios = np.where(den != 0, num / np.where(den != 0, den, 1), np.nan)
    lo, hi = np.nanquantile(ratios, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def step_cost(run: dict[str, Any], naive: dict[str, Any]) -> float | None:
    """Time per step over naive's, from the medians of each kind of step (robust to a busy machine's bursts):
    (1 - f) plain-kind + f SAM-kind, f the run's share of SAM steps."""
    f, plain, sam = run["sam_fraction"], run["plain_step"], run["sam_step"]
    if (f < 1 and plain is None) or (f > 0 and sam is None) or not naive["plain_step"]:
        return None
    return ((1 - f) * (plain or 0.0) + f * (sam or 0.0)) / naive["plain_step"]


def spread(values: list[float | None], fmt: str = "{:.2f}") -> str:
    """``median (min to max)`` of ``values``; the median alone for one value."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "-"
    med = fmt.format(statistics.median(values))
    return med if len(values) == 1 else f"{med} ({fmt.format(min(values))} to {fmt.format(max(values))})"


def summarize(runs: list[dict[str, Any]], specs: list[str]) -> list[dict[str, Any]]:
    """Per strategy, over the seeds (one round each): its cost ratios to naive, sharpness, paired reduction against
    naive, and kept reduction (per seed, of the means with a bootstrap interval, and over every experience)."""
    by = {(r["spec"], r["seed"]): r for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    out = []
    for s in specs:
        v, n, m = ([by[(x, k)] for k in seeds] for x in (s, "naive", "sam"))
        n_time = [a.get("naive", b) for a, b in zip(v, n)]  # timings against the naive of the same job (--merge)
        worst = {key: [r["worst"] for r in rs] for key, rs in (("v", v), ("n", n), ("m", m))}
        every = {key: [statistics.fmean(r["worst_by_experience"]) for r in rs] for key, rs in (("v", v), ("n", n),
                                                                                             ("m", m))}
        paired = paired_test(worst["n"], worst["v"]) if len(seeds) > 1 else None
        paired_every = paired_test(every["n"], every["v"]) if len(seeds) > 1 else None
        out.append({
            "spec": s, "n": len(seeds),
            "cost": [step_cost(a, b) for a, b in zip(v, n_time)],
            "time": [a["seconds"] / b["seconds"] for a, b in zip(v, n_time)],
            "passes": [a["passes"] for a in v], "sam_fraction": [a["sam_fraction"] for a in v],
            "plain_step": [a["plain_step"] / b["plain_step"] if a["plain_step"] else None for a, b in zip(v, n_time)],
            "sam_step": [a["sam_step"] / b["plain_step"] if a["sam_step"] else None for a, b in zip(v, n_time)],
            "worst": worst["v"], "loss": [a["loss"] for a in v],
            "reduction": [a - b for a, b in zip(worst["n"], worst["v"])],
            "reduction_ci": (paired.lo, paired.hi) if paired else (math.nan, math.nan),
            "reduction_p": paired.p if paired else math.nan,
            "kept": [kept_reduction(a, b, c) for a, b, c in zip(worst["n"], worst["m"], worst["v"])],
            "kept_of_means": kept_reduction(*(statistics.fmean(worst[k]) for k in "nmv")),
            "kept_interval": kept_interval(worst["n"], worst["m"], worst["v"]) if len(seeds) > 1 else (math.nan,) * 2,
            "reduction_every": [a - b for a, b in zip(every["n"], every["v"])],
            "reduction_every_ci": (paired_every.lo, paired_every.hi) if paired_every else (math.nan, math.nan),
            "kept_every": kept_reduction(*(statistics.fmean(every[k]) for k in "nmv")),
            "kept_every_interval": kept_interval(every["n"], every["m"], every["v"]) if len(seeds) > 1
            else (math.nan,) * 2,
        })
    return out


def table(summary: list[dict[str, Any]]) -> str:
    """The summary as a markdown table: cost, then the sharpness of the final weights, then the mean over
    experiences of the sharpness after each (of its task's rows)."""
    head = ("| strategy | cost / plain step | wall time / naive | passes / step | SAM steps | its plain / its SAM "
            "steps over naive's | final: worst-case sharpness | loss there | reduction vs naive [95% CI] "
            "| kept, of the means [90% bootstrap] | kept per seed | every experience: reduction [95% CI] "
            "| kept [90% bootstrap] |")
    lines = [head, "|" + " --- |" * (head.count(" | ") + 1)]
    for r in summary:
        lines.append(
            f"| `{r['spec']}` | {spread(r['cost'])} | {spread(r['time'])} | {spread(r['passes'])} "
            f"| {spread(r['sam_fraction'])} | {spread(r['plain_step'])} / {spread(r['sam_step'])} "
            f"| {spread(r['worst'], '{:.4f}')} | {spread(r['loss'], '{:.3f}')} "
            f"| {_mean_ci(r['reduction'], r['reduction_ci'])} | {_kept(r['kept_of_means'], r['kept_interval'])} "
            f"| {spread(r['kept'])} | {_mean_ci(r['reduction_every'], r['reduction_every_ci'])} "
            f"| {_kept(r['kept_every'], r['kept_every_interval'])} |")
    return "\n".join(lines)


def _mean_ci(values: list[float], ci: tuple[float, float]) -> str:
    return f"{statistics.fmean(values):+.4f}" + ("" if math.isnan(ci[0]) else f" [{ci[0]:+.4f}, {ci[1]:+.4f}]")


def _kept(value: float, interval: tuple[float, float]) -> str:
    return f"{value:.2f}" + ("" if math.isnan(interval[0]) else f" [{interval[0]:.2f}, {interval[1]:.2f}]")


def tensor_overhead(model: torch.nn.Module, repeats: int = 3) -> dict[str, float]:
    """Seconds (best of ``repeats``) of the parameter-sized tensor work LookSAM adds, at ``model``'s shapes, beside
    what a plain step's AdamW update costs: the scale of the per-step overhead without any forward or backward."""
    from clsuite.strategies.looksam import _dot
    from clsuite.strategies.sam import SharpnessAware
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(p.detach().clone()) for p in model.parameters() if p.requires_grad]
    g, gs = ([torch.randn(p.shape, generator=gen) for p in params] for _ in range(2))
    opt = torch.optim.AdamW(params, lr=1e-5)
    for p, x in zip(params, g):
        p.grad = x.clone()
    ops = {"AdamW step (in every plain step)": opt.step,
           "copy of the weights (SAM's saved w)": lambda: [p.detach().clone() for p in params],
           "global norm (reuse step: ||g||)": lambda: SharpnessAware._global_norm(g),
           "add alpha g_v in place (reuse step)": lambda: torch._foreach_add_(gs, g, alpha=1e-3),
           "add g_v * scale via a temporary (before)": lambda: [y.add_(x * 1e-3) for x, y in zip(g, gs)],
           "two dot products (SAM step: g.g_s, g.g)": lambda: (_dot(g, gs), _dot(g, g)),
           "g_v formed in place (SAM step)": lambda: [x.mul_(-1.0).add_(y) for x, y in zip(g, gs)]}
    out = {}
    for name, op in ops.items():
        op()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            op()
            times.append(time.perf_counter() - t0)
        out[name] = min(times)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stream", default="tiny-synthetic")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--strategies", default=DEFAULT_STRATEGIES, help="specs, comma-separated; naive and sam required")
    ap.add_argument("--steps", type=int, default=None, help="steps per task (default: the stream's)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None, help="also write every run's figures here")
    ap.add_argument("--overhead", action="store_true", help="only time LookSAM's tensor work at the model's shapes")
    ap.add_argument("--merge", type=Path, nargs="+", default=None,
                    help="print the table of earlier --json results (e.g. one job per seed) and run nothing")
    a = ap.parse_args()
    sys.stdout.reconfigure(line_buffering=True)
    if a.merge:
        missing = [str(p) for p in a.merge if not p.is_file()]
        if missing:
            ap.error(f"--merge: no such file {', '.join(missing)}: give the files earlier runs wrote with --json")
        report([json.loads(p.read_text()) for p in a.merge],
               split_specs(a.strategies) if a.strategies != DEFAULT_STRATEGIES else None)
        return
    torch.set_num_threads(a.threads)
    if a.overhead:
        model = load_model(load_stream(a.stream).model)[0]
        n = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"{a.stream}'s model, {n / 1e6:.1f}M trainable parameters, {torch.get_num_threads()} thread(s):")
        for name, seconds in tensor_overhead(model).items():
            print(f"  {name:<45} {seconds * 1e3:8.1f} ms")
        return
    specs = split_specs(a.strategies)
    if "naive" not in specs or ("sam" not in specs and not a.json):
        raise SystemExit("--strategies must include naive and sam (the references of the ratios); without sam, "
                         "give --json and --merge the result with one that has sam at the same seeds")
    seeds = [int(s) for s in a.seeds.split(",")]
    stream = load_stream(a.stream)
    base, tok = load_model(stream.model)
    train_stream(base, tok, dataclasses.replace(stream, tasks=stream.tasks[:1]), "naive", seeds[0], 1)  # warm-up
    runs = []
    load = [os.getloadavg()[0]]
    for seed in seeds:
        for spec in specs[seed % len(specs):] + specs[:seed % len(specs)]:  # rotated: no strategy always first
            runs.append(train_stream(base, tok, stream, spec, seed, a.steps))
            load.append(os.getloadavg()[0])
            r = runs[-1]
            print(f"  seed {seed} {spec}: {r['seconds'] / r['steps']:.3f} s/step, passes {r['passes']:.2f}, "
                  f"SAM {r['sam_fraction']:.2f}, worst {' '.join(f'{w:.5f}' for w in r['worst_by_experience'])}, "
                  f"loss {r['loss']:.3f}")
    cfg = resolve_config(stream, "naive", seeds[0], train={"steps": a.steps} if a.steps else None)
    result = {"stream": a.stream, "seeds": seeds, "threads": torch.get_num_threads(), "steps": cfg.train.steps,
              "tasks": len(stream.tasks), "batch_size": cfg.train.batch_size,
              "sharpness_examples": cfg.eval.sharpness_examples, "load": [min(load), max(load)],
              "command": " ".join(sys.argv), "runs": runs}
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))
    if "sam" in specs:
        report([result], specs)


def report(results: list[dict[str, Any]], specs: list[str] | None = None) -> None:
    """Print the header and the table of one or more harness results (same stream and steps, distinct seeds)."""
    r0 = results[0]
    if any((r["stream"], r["steps"]) != (r0["stream"], r0["steps"]) for r in results):
        raise SystemExit("--merge: the results must be of one stream with the same steps")
    runs, seen = [], {}
    for r in results:  # each run timed against its own job's naive; a repeated (strategy, seed) is kept once
        naive = {run["seed"]: run for run in r["runs"] if run["spec"] == "naive"}
        for run in r["runs"]:
            key = (run["spec"], run["seed"])
            if key in seen:
                same = seen[key]["worst_by_experience"] == run["worst_by_experience"]
                print(f"  {key[0]} at seed {key[1]} is in two jobs: {'same' if same else 'DIFFERENT'} sharpness, "
                      "the first kept")
                continue
            seen[key] = run
            runs.append({**run, "naive": naive[run["seed"]]} if run["seed"] in naive else run)
    specs = specs or list(dict.fromkeys(run["spec"] for run in runs))
    if "naive" not in specs or "sam" not in specs:
        raise SystemExit("the table needs runs of naive and sam (the references of the ratios)")
    seeds = sorted({run["seed"] for run in runs})
    missing = [(s, k) for s in specs for k in seeds if not any(r["spec"] == s and r["seed"] == k for r in runs)]
    if missing:
        raise SystemExit(f"no run of {missing[0][0]} at seed {missing[0][1]}: every strategy needs every seed")
    load = [x for r in results for x in r["load"]]
    print(f"\n{r0['stream']}: {r0['tasks']} task(s) x {r0['steps']} steps x batch {r0['batch_size']}, "
          f"seeds {','.join(map(str, seeds))}, {r0['threads']} thread(s), "
          f"load average {min(load):.1f}-{max(load):.1f}; "
          f"worst-case sharpness at rho={RHO}, {ASCENT_STEPS} ascent step, first {r0['sharpness_examples']} train "
          f"rows of the last task")
    for r in results:
        print(f"  command: {r['command']}")
    summary = summarize(runs, specs)
    print(table(summary))
    print(f"\ntarget (issue 13): cost <= {COST_TARGET}x a plain step and kept >= {KEPT_TARGET:.0%} of SAM's reduction")
    for r in summary:
        if r["spec"] in ("naive", "sam"):
            continue
        cost, kept = statistics.median(c for c in r["cost"] if c is not None), r["kept_of_means"]
        verdict = "meets" if cost <= COST_TARGET and kept >= KEPT_TARGET else "misses"
        print(f"  {verdict}: {r['spec']} (cost {cost:.2f}x, kept {kept:.2f})")


if __name__ == "__main__":
    main()
