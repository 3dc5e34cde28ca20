"""Performance of clsuite on SmolLM2-135M in one run: matmul peak, the engine against a plain training loop, the
SAM variants against naive, scorer throughput against lm-eval's HFLM, exact match before and after its early stop,
and one smollm2-bbc run timed by phase. Each figure is the median of interleaved repeats, its min-max beside it.

    python perf/real_model.py [--repeats 3] [--steps 4] [--threads 2] [--cloze-items 200] [--long-items 16]
        [--exact-items 24] [--scorers-only] [--quick]
"""
from __future__ import annotations

import argparse
import copy
import itertools
import logging
import random
import statistics
import sys
import time
from typing import Any

import torch
import transformers

from clsuite import engine
from clsuite.config import RunConfig, resolve_config
from clsuite.data import collate, encode_pair, prompt_text
from clsuite.engine import Context, evaluate, set_seed, train_experience
from clsuite.models import load_model
from clsuite.scoring import _batches, _left_pad, _pad_id, choice_logliks, exact_match
from clsuite.strategy import build_strategy
from clsuite.streams import DATA_BUILDERS, Stream, load_stream

VARIANTS = ("sam", "looksam", "sssam", "aesam", "msam")
LM_EVAL = {"bos": False, "target_delimiter": " "}  # lm-eval's conventions, so predictions can be compared


def figure(values: list[float], fmt: str = "{:.2f}", unit: str = "x") -> str:
    """``median<unit> (min-max, n repeats)`` of ``values``, the numbers written with ``fmt``."""
    n, show = len(values), fmt.format
    return (f"{show(statistics.median(values))}{unit} ({show(min(values))}-{show(max(values))}, "
            f"{n} repeat{'s' * (n > 1)})")


def matmul_peak(repeats: int, n: int = 2048) -> list[float]:
    """GFLOP/s of fp32 ``n x n`` matmuls in this process, one figure per repeat (after a warm-up)."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)
    a @ b
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        out.append(2 * n ** 3 / (time.perf_counter() - t0) / 1e9)
    return out


def engine_batches(stream: Stream, cfg: RunConfig, tok: Any) -> list[dict[str, torch.Tensor]]:
    """The batches train_experience draws for the first task (its seeded shuffle), collated in the task's format."""
    task, tc = stream.tasks[0], cfg.train
    draw = engine._batches(task.train, tc.batch_size, torch.Generator().manual_seed(cfg.seed * 1000))
    return [collate(tok, next(draw), task.chat, tc.max_length, **task.conventions()) for _ in range(tc.steps)]


def plain_loop(base: torch.nn.Module, batches: list[dict], cfg: RunConfig) -> float:
    """Seconds per step of a hand-written loop on a copy of ``base``: the model's own loss, AdamW, clip 1.0."""
    model = copy.deepcopy(base).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    t0 = time.perf_counter()
    for b in batches:
        loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
        opt.step()
        float(loss.detach())
    return (time.perf_counter() - t0) / len(batches)


def engine_run(base: torch.nn.Module, tok: Any, stream: Stream, spec: str, steps: int) -> dict[str, float]:
    """Train ``spec`` through train_experience on the first task from a copy of ``base``: seconds per step,
    optimizer seconds, non-pad tokens and the SAM-step fraction."""
    cfg = resolve_config(stream, spec, 0, train={"steps": steps})
    ctx = Context(copy.deepcopy(base), tok, stream, cfg, build_strategy(spec), random.Random(0), experience=0,
                  task=stream.tasks[0])
    spent, start, make = [], [0.0], engine.make_optimizer

    def timed(params: list, cfg: Any) -> torch.optim.Optimizer:  # the engine's optimizer, its steps timed
        opt = make(params, cfg)
        opt.register_step_pre_hook(lambda *_: start.__setitem__(0, time.perf_counter()))
        opt.register_step_post_hook(lambda *_: spent.append(time.perf_counter() - start[0]))
        return opt

    ctx.call("before_training")
    ctx.call("before_training_exp")
    engine.make_optimizer = timed
    try:
        out = train_experience(ctx, progress=False)
    finally:
        engine.make_optimizer = make
    report = {k: v for p in ctx.plugins for k, v in p.cost_report().items()}
    return {"step": out["train_seconds"] / steps, "seconds": out["train_seconds"], "optimizer": sum(spent),
            "tokens": out["tokens"], "sam": report.get("sam_step_fraction", 0.0)}


def useful_flops(model: torch.nn.Module, batches: list[dict]) -> tuple[float, str]:
    """FLOPs a step needs (dense 6NT, output head at target tokens, attention), and how they were counted."""
    c = model.config
    embeddings = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    n = sum(p.numel() for p in model.parameters() if id(p) not in embeddings)
    lengths = [int(x) for b in batches for x in b["attention_mask"].sum(1)]
    targets = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    dense, head = 6 * n * sum(lengths), 2 * 3 * c.hidden_size * c.vocab_size * targets
    attention = sum(4 * c.num_hidden_layers * c.hidden_size * s * s * 3 for s in lengths)
    how = (f"{dense + head + attention:.3g} FLOPs = 6 x {n / 1e6:.1f}M non-embedding x {sum(lengths)} tokens "
           f"{dense:.3g} + head at {targets} target tokens {head:.3g} + attention {attention:.3g}")
    return dense + head + attention, how


def training(base: torch.nn.Module, tok: Any, stream: Stream, steps: int, repeats: int, peak: float) -> None:
    """Engine against the plain loop, and each SAM variant against naive, in interleaved rounds."""
    cfg = resolve_config(stream, "naive", 0, train={"steps": steps})
    batches = engine_batches(stream, cfg, tok)
    plain_loop(base, batches[:1], cfg)  # warm-up
    engine_run(base, tok, stream, "naive", 1)
    specs = ["plain", "naive", *VARIANTS]
    runs: dict[str, list[dict[str, float]]] = {s: [] for s in specs}
    for r in range(repeats):
        for spec in specs[r % len(specs):] + specs[:r % len(specs)]:  # rotated: no one always runs first
            runs[spec].append({"step": plain_loop(base, batches, cfg)} if spec == "plain"
                              else engine_run(base, tok, stream, spec, steps))
    naive, plain = runs["naive"], runs["plain"]
    eng = [n["step"] / p["step"] for n, p in zip(naive, plain)]
    print(f"engine/plain step time: {figure(eng)}; engine "
          f"{statistics.median(n['step'] for n in naive):.2f} s/step, plain "
          f"{statistics.median(p['step'] for p in plain):.2f} s/step ({steps} steps x batch {cfg.train.batch_size})")
    print(f"tokens/s: {figure([n['tokens'] / n['seconds'] for n in naive], '{:.0f}', '')}")
    flops, how = useful_flops(base, batches)
    shares = [100 * flops / n["seconds"] / 1e9 / peak for n in naive]
    print(f"useful FLOPs share of matmul peak: {figure(shares, '{:.1f}', '%')}; {how}")
    print(f"optimizer step share: {figure([100 * n['optimizer'] / n['seconds'] for n in naive], '{:.1f}', '%')}")
    padded = sum(b["attention_mask"].numel() for b in batches)
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    print(f"padding waste: {(padded - real) / padded:.1%} ({padded - real} of {padded} padded tokens, "
          f"{len(batches)} batches)")
    for v in VARIANTS:
        ratios = [x["step"] / n["step"] for x, n in zip(runs[v], naive)]
        print(f"{v}/plain step time: {figure(ratios)} against naive; "
              f"SAM steps {statistics.median(x['sam'] for x in runs[v]):.2f}")


def optimizer_step(base: torch.nn.Module, repeats: int, steps: int = 3) -> None:
    """AdamW's step on every parameter of ``base`` with random gradients: torch's CPU default (one tensor at a time:
    what the plain loop, and the engine before, got) against fused (what engine.make_optimizer now gets), in
    interleaved rounds; and how far their weights part after ``steps``."""
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(p.shape, generator=gen) * 1e-3 for p in base.parameters()]

    def run(kind: str) -> tuple[float, list[torch.Tensor]]:
        params = [p.detach().clone().requires_grad_() for p in base.parameters()]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.01, **({"fused": True} if kind == "fused" else {}))
        opt.step()  # the first step allocates the moments
        t0 = time.perf_counter()
        for _ in range(steps):
            opt.step()
        return (time.perf_counter() - t0) / steps, params

    times: dict[str, list[float]] = {"default": [], "fused": []}
    weights: dict[str, list[torch.Tensor]] = {}
    for r in range(repeats):
        for kind in (("default", "fused") if r % 2 == 0 else ("fused", "default")):
            seconds, weights[kind] = run(kind)
            times[kind].append(seconds)
    diff = max(float((a - b).detach().abs().max()) for a, b in zip(weights["default"], weights["fused"]))
    ratio = figure([f / e for f, e in zip(times["fused"], times["default"])])
    print(f"optimizer step, fused/default AdamW time: {ratio}; default {statistics.median(times['default']):.3f} s, "
          f"fused {statistics.median(times['fused']):.3f} s per step; max weight difference after {steps + 1} "
          f"steps {diff:.1e}")


@torch.no_grad()
def exact_match_before(model: torch.nn.Module, tok: Any, rows: list[dict], chat: bool, batch: int) -> list[int]:
    """The exact-match scorer before it stopped early: rows in their given order, each batch generating its longest
    target's length + 1 tokens for every row (clsuite before f1b93d1)."""
    hits = []
    for chunk in _batches(rows, batch):
        pairs = [encode_pair(tok, e["prompt"], e["target"], chat, 512) for e in chunk]
        ids, mask = _left_pad([p for p, _ in pairs], _pad_id(tok))
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(len(t) for _, t in pairs) + 1,
                             do_sample=False, pad_token_id=_pad_id(tok), eos_token_id=tok.eos_token_id)
        texts = tok.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
        hits += [int(t.strip() == e["target"].strip()) for t, e in zip(texts, chunk)]
    return hits


def exact_match_case(model: torch.nn.Module, tok: Any, n: int, repeats: int, batch: int) -> None:
    """Greedy exact match on ``n`` arithmetic word problems (the smollm2-mix task, answers as text) through the chat
    template: the scorer (early stop, batches by length) against exact_match_before, interleaved."""
    rows = [{"prompt": r["prompt"], "target": r["target"]}
            for r in DATA_BUILDERS.get("arithmetic_word")(seed=0, n_train=1, n_eval=n)["eval"]]
    fns = {"now": lambda: exact_match(model, tok, rows, True, 512, batch)["items"],
           "before": lambda: exact_match_before(model, tok, rows, True, batch)}
    rates: dict[str, list[float]] = {"now": [], "before": []}
    hits = {}
    for i in range(repeats):
        for side in (("now", "before") if i % 2 == 0 else ("before", "now")):
            t0 = time.perf_counter()
            hits[side] = fns[side]()
            rates[side].append(n / (time.perf_counter() - t0))
    ratio = figure([a / b for a, b in zip(rates["now"], rates["before"])])
    print(f"scorer exact match: {statistics.median(rates['now']):.1f} items/s, before "
          f"{statistics.median(rates['before']):.1f} items/s, ratio {ratio}; {n} arithmetic items, batch {batch}")
    print(f"agreement exact match: {sum(a == b for a, b in zip(hits['now'], hits['before']))}/{n} items scored "
          f"alike, score {sum(hits['now']) / n:.3f}")


def cloze_items(stream: Stream, n: int) -> list[dict]:
    """``n`` probe items taken from the probes in turn (round robin), choices without their leading space (the
    delimiter's)."""
    rows = [r for group in itertools.zip_longest(*(p.eval for p in stream.probes)) for r in group if r is not None][:n]
    return [{"prompt": r["prompt"], "choices": [c.removeprefix(" ") for c in r["choices"]]} for r in rows]


def scorer_case(name: str, model: torch.nn.Module, tok: Any, rows: list[dict], chat: bool, repeats: int,
                batch: int, delimiter: str = " ") -> None:
    """clsuite's choice_logliks against HFLM.loglikelihood on the same items, model and batch size (lm-eval sorts
    its requests by length and reuses one pass for one-token choices of a context): items/s and agreement.
    ``delimiter``: lm-eval's target_delimiter, " " by default and "" under its --apply_chat_template."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch)  # also puts the model in eval mode
    requests = [Instance("loglikelihood", {}, (prompt_text(tok, r["prompt"], chat, bos=False), delimiter + c), i)
                for i, (r, c) in enumerate((r, c) for r in rows for c in r["choices"])]
    conventions = {**LM_EVAL, "target_delimiter": delimiter}

    def ours() -> list[list[float]]:
        return choice_logliks(model, tok, rows, chat, 512, batch, **conventions)

    def theirs() -> list[list[float]]:
        it = iter(ll for ll, _ in lm.loglikelihood(requests, disable_tqdm=True))
        return [[next(it) for _ in r["choices"]] for r in rows]

    choice_logliks(model, tok, rows[:2], chat, 512, batch, **conventions)  # warm-up
    lm.loglikelihood(requests[:2], disable_tqdm=True)
    rates: dict[str, list[float]] = {"clsuite": [], "lm-eval": []}
    scores: dict[str, list[list[float]]] = {}
    for i in range(repeats):
        for side, fn in ([("clsuite", ours), ("lm-eval", theirs)][::1 if i % 2 == 0 else -1]):
            t0 = time.perf_counter()
            scores[side] = fn()
            rates[side].append(len(rows) / (time.perf_counter() - t0))
    ratio = [a / b for a, b in zip(rates["clsuite"], rates["lm-eval"])]
    print(f"scorer {name}: clsuite {statistics.median(rates['clsuite']):.1f} items/s, lm-eval "
          f"{statistics.median(rates['lm-eval']):.1f} items/s, ratio {figure(ratio)}")
    pick = [[max(range(len(s)), key=s.__getitem__) for s in scores[side]] for side in ("clsuite", "lm-eval")]
    print(f"agreement {name}: {sum(a == b for a, b in zip(*pick))}/{len(rows)} predictions identical")


def run_breakdown(stream: Stream, steps: int | None, max_examples: int | None) -> None:
    """One naive run (seed 0) timed by phase: load, row 0, train, evaluate."""
    cfg = resolve_config(stream, "naive", 0, train={"steps": steps} if steps else None,
                         eval={"max_examples": max_examples} if max_examples else None)
    set_seed(cfg.seed)
    phases: dict[str, float] = {"load": 0.0, "row 0": 0.0, "train": 0.0, "evaluate": 0.0}
    t0 = time.perf_counter()
    model, tok = load_model(cfg.model)
    phases["load"] = time.perf_counter() - t0
    ctx = Context(model, tok, stream, cfg, build_strategy("naive"), random.Random(cfg.seed))

    def row() -> None:
        evaluate(ctx, stream.tasks)
        evaluate(ctx, stream.probes)

    t0 = time.perf_counter()
    row()
    phases["row 0"] = time.perf_counter() - t0
    ctx.call("before_training")
    for ctx.experience, ctx.task in enumerate(stream.tasks):
        t0 = time.perf_counter()
        ctx.call("before_training_exp")
        train_experience(ctx, progress=False)
        ctx.call("after_training_exp")
        phases["train"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        row()
        phases["evaluate"] += time.perf_counter() - t0
    ctx.call("after_training")
    total = sum(phases.values())
    print("run wall time breakdown: " + ", ".join(f"{k} {v:.1f} s ({v / total:.0%})" for k, v in phases.items())
          + f"; total {total:.1f} s ({cfg.train.steps} steps, "
          + (f"{max_examples} items per task and probe)" if max_examples else "all items)"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4,
                    help="training steps per timed run (4: LookSAM at its 1/4 SAM-step share of the stream)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default 2; 1 with --quick)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (1 repeat, 2 steps, 10 items): a smoke run")
    ap.add_argument("--scorers-only", action="store_true",
                    help="only the optimizer and scorer figures (no training, no run)")
    ap.add_argument("--long-items", type=int, default=16,
                    help="BBC items of the long-prompt scorer case (lm-eval takes about 1 s for each)")
    ap.add_argument("--cloze-items", type=int, default=200, help="probe items of the short cloze scorer case")
    ap.add_argument("--exact-items", type=int, default=24, help="arithmetic items of the exact-match case")
    a = ap.parse_args()
    start = time.perf_counter()
    sys.stdout.reconfigure(line_buffering=True)  # figures appear as they are measured
    torch.set_num_threads(a.threads or (1 if a.quick else 2))
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    import lm_eval
    repeats, steps = (1, 2) if a.quick else (a.repeats, a.steps)
    cloze, long, gen = (10, 10, 10) if a.quick else (a.cloze_items, a.long_items, a.exact_items)
    print(f"torch threads {torch.get_num_threads()}, torch {torch.__version__}, transformers "
          f"{transformers.__version__}, lm-eval {lm_eval.__version__}{' (--quick: tiny sizes)' if a.quick else ''}")
    sections: dict[str, float] = {}
    mark = [time.perf_counter()]

    def done(name: str) -> None:  # the seconds since the last section ended, under ``name``
        now = time.perf_counter()
        sections[name], mark[0] = now - mark[0], now

    peaks = matmul_peak(3 if a.quick else 10)
    print(f"matmul peak: {figure(peaks, '{:.1f}', ' GFLOP/s')}")
    stream = load_stream("smollm2-bbc")
    base, tok = load_model(stream.model)
    done("peak and load")
    if not a.scorers_only:
        training(base, tok, stream, steps, repeats, statistics.median(peaks))
        done("training")
    optimizer_step(base, repeats)
    done("optimizer")
    batch = stream.eval.get("batch_size", 16)
    scorer_case("short cloze", base, tok, cloze_items(stream, cloze), False, repeats, batch)
    done("short cloze")
    topics = stream.tasks[0]
    rows = [{"prompt": r["prompt"], "choices": r["choices"]} for r in topics.eval.select(range(long))]
    # lm-eval's convention under a chat template (lm_eval/api/task.py: target_delimiter "" unless a gen_prefix is
    # set): most topic names are then two or three tokens, so lm-eval runs one pass per choice
    scorer_case("long prompt", base, tok, rows, topics.chat, repeats, batch, delimiter="")
    done("long prompt")
    exact_match_case(base, tok, gen, repeats, batch)
    done("exact match")
    del base
    if not a.scorers_only:
        run_breakdown(stream, 2 if a.quick else None, 10 if a.quick else None)
        done("run breakdown")
    print(f"harness wall time: {time.perf_counter() - start:.0f} s ("
          + ", ".join(f"{k} {v:.0f} s" for k, v in sections.items()) + ")")


if __name__ == "__main__":
    main()
