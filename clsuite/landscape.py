"""Loss landscapes of runs: sharpness scalars after each experience, 2-D surfaces of a saved model, and the
correlation of sharpness with forgetting across runs (the claim under test: forgetting grows with sharpness).

Formulas and costs are in :mod:`clsuite.flatness`. Run records carry no weights: ``clsuite landscape`` reads a
``save_pretrained`` directory (``--checkpoint``: model + tokenizer) or loads a model by name (``--model``,
default the stream's base model).

Caveat for comparisons across strategies: sharpness is measured over ``ctx.trainable_parameters()``, i.e. the
LoRA adapter for ``lora`` (mode continue) but every weight for full fine-tuning (and for ``lora(mode=merge)``
after its merge); ρ-ball sharpness, Hessian trace and eigenvalue are not comparable between the two.
"""
from __future__ import annotations

import difflib
import itertools
import json
import math
import os
import random
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from . import flatness as fl
from .data import lm_loss
from .errors import UserError
from .leaderboard import row_label
from .records import (RunRecord, atomic_write_json, atomic_write_text, find_records, read_record, run_sharpness,
                      slug)

__all__ = ["measure_sharpness", "sharpness_scalars", "fixed_batch_loss", "landscape", "compare_landscapes",
           "correlate"]

PREFIX = "sharpness_"
LEVELS = ("cheap", "full")
# Forgetting metric -> sign of the correlation with sharpness that the claim predicts.
FORGETTING_METRICS = {"forgetting": +1, "bwt": -1, "probe_retention": -1, "probe_loglik_retention": -1,
                      "probe_fg": +1}
WITHIN_PERMUTATIONS = 10_000  # Monte Carlo permutations (within strategies) for the within-strategy p-value
EXACT_P_MAX_N = 9  # p-values by exact permutation test up to this many runs (n! pairings), else scipy's
# Settings of the scalars (fixed, so numbers are comparable between runs).
RHO, ASCENT_STEPS, TRACE_SAMPLES, EIG_ITERS, GRID, SPAN = 0.05, 1, 5, 10, 7, 1.0


# ------------------------------------------------------------------------------------------ scalars
def _finite(x: Any) -> float | None:
    """``x`` as a float when finite, else None (records are strict JSON: no NaN/inf)."""
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _first_rows(data: Any, n: int) -> list[dict]:
    """The first ``n`` rows of a dataset (deterministic), as dicts."""
    if n < 1:
        raise ValueError("n_examples must be >= 1")
    return [dict(data[i]) for i in range(min(n, len(data)))]


def sharpness_scalars(model: torch.nn.Module, loss_fn: Callable[[], torch.Tensor],
                      params: Sequence[torch.Tensor] | None = None, level: str = "cheap",
                      seed: int = 0) -> dict[str, float | None]:
    """``sharpness_*`` scalars of a fixed-batch loss: worst-case (ρ=0.05, 1 step) and Hutchinson trace (5 samples);
    ``full`` adds top eigenvalue (10 iters) and 7×7 filter-normalized surface metrics. Non-finite values -> None."""
    if level not in LEVELS:
        raise ValueError(f"sharpness level {level!r}: choose one of {', '.join(LEVELS)}")
    kw: dict[str, Any] = dict(seed=seed, disable_progress=True)
    out = {"worst": fl.worst_case_sharpness(model, loss_fn, params, rho=RHO, steps=ASCENT_STEPS, **kw),
           "trace": fl.hessian_trace(model, loss_fn, params, samples=TRACE_SAMPLES, **kw)}
    if level == "full":
        out["top_eig"] = fl.hessian_top_eigenvalue(model, loss_fn, params, iters=EIG_ITERS, **kw)
        surface = fl.loss_surface_2d(model, loss_fn, params, span=SPAN, steps=GRID, filter_normalize=True, **kw)
        out.update(fl.surface_sharpness(surface))
    return {PREFIX + k: _finite(v) for k, v in out.items()}


def measure_sharpness(ctx: Any, level: str = "cheap", n_examples: int = 32, seed: int = 0) -> dict[str, float | None]:
    """Sharpness scalars of ``ctx.model`` on the first ``n_examples`` train rows of ``ctx.task``; weights, modes,
    ``.grad`` and the global RNG are left as found."""
    if ctx.task is None or ctx.task.train is None:
        raise ValueError("measure_sharpness needs ctx.task with a train split (call it after an experience)")
    batch = ctx.collate(_first_rows(ctx.task.train, n_examples))  # same as ctx.loss(rows), tokenized once
    return sharpness_scalars(ctx.model, lambda: lm_loss(ctx.model, batch), ctx.trainable_parameters(), level, seed)


# ------------------------------------------------------------------------------------------ landscape
def _find_task(stream: Any, name: str) -> Any:
    """The task or probe called ``name``; a UserError naming the stream's tasks and probes otherwise."""
    for t in stream.tasks + stream.probes:
        if t.name == name:
            return t
    names = [t.name for t in stream.tasks + stream.probes]
    close = difflib.get_close_matches(name, names, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    probes = ", ".join(p.name for p in stream.probes) or "none"
    raise UserError(f"unknown task {name!r} in stream {stream.name}: {hint}tasks: "
                    f"{', '.join(t.name for t in stream.tasks)}; probes: {probes}")


def _check_checkpoint(path: Path) -> None:
    """A one-line UserError unless ``path`` is a save_pretrained directory with a tokenizer."""
    if path.is_file() and path.suffix == ".json":
        raise UserError(f"{path} is a file, not a model: run records carry no weights; give the save_pretrained "
                        "directory of a model with --checkpoint, or a model name with --model")
    if not path.exists():
        raise UserError(f"checkpoint {path} not found: give a directory written by save_pretrained "
                        "(config.json, weights and tokenizer)")
    if not path.is_dir():
        raise UserError(f"checkpoint {path} is not a directory: give a directory written by save_pretrained")
    if not (path / "config.json").exists():
        if (path / "adapter_config.json").exists():
            raise UserError(f"checkpoint {path} holds a PEFT adapter only: merge it (merge_and_unload) and "
                            "save_pretrained the merged model")
        raise UserError(f"checkpoint {path} has no config.json: give a directory written by save_pretrained")
    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise UserError(f"checkpoint {path} has no tokenizer: save it beside the weights "
                        "(tokenizer.save_pretrained(DIR))")


def _surface_json(surface: dict[str, Any]) -> dict[str, Any]:
    """A surface dict from flatness with numpy arrays as lists."""
    return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in surface.items()}


def _model_label(source: str, is_checkpoint: bool) -> str:
    """A short name for plots: ``sam/seed0.model`` for a run's saved model, the name itself otherwise."""
    path = Path(source).resolve()
    return f"{path.parent.name}/{path.name}" if is_checkpoint else source


def fixed_batch_loss(stream: Any, task: Any, source: str, data: Any, n: int, seed: int = 0
                     ) -> tuple[torch.nn.Module, Callable[[], torch.Tensor], list[torch.Tensor], list[dict]]:
    """Model ``source`` loaded, and the loss on the first ``n`` rows of ``data`` (a split of ``task``) as the
    engine computes it: (model, loss_fn, trainable parameters, rows)."""
    from .engine import Context
    from .models import load_model
    from .runner import resolve_config
    net, tok = load_model(source)
    ctx = Context(net, tok, stream, resolve_config(stream, "naive", seed, source), [], random.Random(seed), task=task)
    rows = _first_rows(data, n)
    batch = ctx.collate(rows)
    return net, (lambda: lm_loss(net, batch)), ctx.trainable_parameters(), rows


def landscape(stream: str, task: str, checkpoint: Path | None = None, model: str | None = None,
              split: str = "eval", n: int = 32, grid: int = 11, span: float = 1.0, out: Path | None = None,
              seed: int = 0, line_steps: int = 0, progress: bool = False) -> dict[str, Any]:
    """2-D (and optional 1-D) loss surface plus cheap sharpness scalars of one model on the first ``n`` rows of a
    task's split; writes ``<task>-<split>{.json,_contour.png,_3d.png[,_1d.png]}`` under ``out``."""
    from .landscape_plot import plot_surface
    from .provenance import provenance
    from .streams import load_stream

    if split not in ("eval", "train"):
        raise UserError(f"--split {split!r}: choose eval or train")
    if n < 1:
        raise UserError(f"--n {n}: give at least 1 example")
    if grid < 3:
        raise UserError(f"--grid {grid}: give at least 3 points per axis")
    if not (span > 0 and math.isfinite(span)):
        raise UserError(f"--span {span}: give a positive number")
    if line_steps and line_steps < 3:
        raise UserError(f"--line-steps {line_steps}: give 0 (no 1-D surface) or at least 3")
    if checkpoint is not None and model is not None:
        raise UserError("give either --checkpoint or --model, not both")
    if checkpoint is not None:
        checkpoint = Path(checkpoint)
        _check_checkpoint(checkpoint)
    s = load_stream(stream)
    t = _find_task(s, task)
    data = t.eval if split == "eval" else t.train
    if data is None:
        raise UserError(f"{t.name!r} is a probe and has no train split: use --split eval")
    source = str(checkpoint) if checkpoint is not None else (model or s.model)
    label = _model_label(source, checkpoint is not None)
    out = Path(out) if out is not None else Path("landscapes") / slug(s.name) / slug(source)

    t0 = time.perf_counter()
    net, loss_fn, params, rows = fixed_batch_loss(s, t, source, data, n, seed)
    kw: dict[str, Any] = dict(seed=seed, disable_progress=not progress)
    surface = fl.loss_surface_2d(net, loss_fn, params, span=span, steps=grid, filter_normalize=True, **kw)
    if not np.isfinite(surface["loss"]).all():
        raise UserError(f"the loss is not finite somewhere on the surface at --span {span}: lower --span")
    line = (fl.loss_surface_1d(net, loss_fn, params, span=span, steps=line_steps, filter_normalize=True, **kw)
            if line_steps else None)
    if line is not None and not np.isfinite(line["loss"]).all():
        raise UserError(f"the loss is not finite somewhere on the 1-D surface at --span {span}: lower --span")
    scalars = sharpness_scalars(net, loss_fn, params, "cheap", seed)

    prefix = out / f"{slug(t.name)}-{split}"
    title = f"{label} · {s.name}/{t.name} ({split}, n={len(rows)})"
    pngs = plot_surface(surface, prefix, title) + (plot_surface(line, prefix, title) if line is not None else [])
    doc = {
        "kind": "clsuite-landscape", "version": 1, "model": source,
        "model_source": "checkpoint" if checkpoint is not None else "model",
        "stream": s.name, "task": t.name, "is_probe": any(p is t for p in s.probes), "split": split,
        "n_examples": len(rows), "seed": seed, "grid": grid, "span": span, "filter_normalize": True,
        "parameters": sum(p.numel() for p in params),
        "surface": _surface_json(surface), "line": _surface_json(line) if line is not None else None,
        "surface_sharpness": fl.surface_sharpness(surface), "sharpness": scalars,
        "sharpness_settings": {"rho": RHO, "ascent_steps": ASCENT_STEPS, "trace_samples": TRACE_SAMPLES},
        "seconds": time.perf_counter() - t0, "files": [p.name for p in pngs], "provenance": provenance(),
    }
    json_path = prefix.with_name(prefix.name + ".json")
    atomic_write_json(json_path, doc)  # written last: its presence means the PNGs are complete
    return {**doc, "json": str(json_path), "pngs": [str(p) for p in pngs]}


def compare_landscapes(paths: Sequence[Path | str], out: Path | str) -> Path:
    """One PNG with the contour of each landscape JSON side by side on one colour scale (e.g. naive vs SAM);
    the surfaces must share task, split, examples, grid and span."""
    from .landscape_plot import plot_surfaces_side_by_side
    if len(paths) < 2:
        raise UserError("give at least two landscape .json files (written by clsuite landscape) to compare")
    docs = {}
    for path in map(Path, paths):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"{path}: not a readable landscape JSON ({e}); give the .json clsuite landscape wrote")
        if not isinstance(doc, dict) or doc.get("kind") != "clsuite-landscape":
            raise UserError(f"{path} is not a clsuite landscape JSON (no kind: clsuite-landscape)")
        docs[path] = doc
    keys = ("stream", "task", "split", "n_examples", "grid", "span", "seed")
    first = next(iter(docs.values()))
    for path, doc in docs.items():
        differ = [k for k in keys if doc.get(k) != first.get(k)]
        if differ:
            raise UserError(f"{path} differs from {next(iter(docs))} in {', '.join(differ)}: compare surfaces "
                            "made with the same clsuite landscape settings")
    names = [_model_label(d["model"], d["model_source"] == "checkpoint") for d in docs.values()]
    if len(set(names)) < len(names):
        names = [str(p) for p in docs]
    title = f"{first['stream']}/{first['task']} ({first['split']}, n={first['n_examples']}, span ±{first['span']})"
    return plot_surfaces_side_by_side(dict(zip(names, (d["surface"] for d in docs.values()))), Path(out), title)


# ------------------------------------------------------------------------------------------ correlate
def _spearman_ci(x: np.ndarray, y: np.ndarray, n_boot: int, seed: int) -> tuple[float, float]:
    """Percentile 95% bootstrap CI of Spearman's ρ (resamples with a constant side are dropped)."""
    from scipy.stats import rankdata
    idx = np.random.default_rng(seed).integers(0, len(x), size=(n_boot, len(x)))
    rx, ry = rankdata(x[idx], axis=1), rankdata(y[idx], axis=1)
    rx -= rx.mean(1, keepdims=True)
    ry -= ry.mean(1, keepdims=True)
    den = np.sqrt((rx**2).sum(1) * (ry**2).sum(1))
    rho = (rx * ry).sum(1)[den > 0] / den[den > 0]
    if len(rho) < n_boot // 2:
        return math.nan, math.nan
    lo, hi = np.percentile(np.clip(rho, -1.0, 1.0), [2.5, 97.5])
    return float(lo), float(hi)


def _exact_p(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided p-value of Pearson's r of (a, b) by an exact permutation test over all n! pairings."""
    a0, b0 = a - a.mean(), b - b.mean()
    cov = b0[np.array(list(itertools.permutations(range(len(b)))))] @ a0  # ∝ r: the norms do not change
    obs = abs(float(b0 @ a0))
    return float(np.mean(np.abs(cov) >= obs - 1e-9 * (obs + 1e-12)))


def _pair_stats(x: np.ndarray, y: np.ndarray, n_boot: int, seed: int) -> dict[str, float]:
    """Spearman ρ (p, bootstrap CI) and Pearson r (p); p exact by permutation for n <= EXACT_P_MAX_N."""
    from scipy import stats
    nan = dict(spearman=math.nan, spearman_p=math.nan, spearman_ci_low=math.nan, spearman_ci_high=math.nan,
               pearson=math.nan, pearson_p=math.nan)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sp, pe = stats.spearmanr(x, y), stats.pearsonr(x, y)
    sp_p, pe_p = float(sp.pvalue), float(pe.pvalue)
    if len(x) <= EXACT_P_MAX_N:
        sp_p, pe_p = _exact_p(stats.rankdata(x), stats.rankdata(y)), _exact_p(x, y)
    lo, hi = _spearman_ci(x, y, n_boot, seed)
    return dict(spearman=float(sp.statistic), spearman_p=sp_p, spearman_ci_low=lo, spearman_ci_high=hi,
                pearson=float(pe.statistic), pearson_p=pe_p)


def _within_stats(x: np.ndarray, y: np.ndarray, groups: np.ndarray, seed: int) -> dict[str, float]:
    """Pooled within-strategy correlation: x and y minus their strategy's mean (strategies with >= 2 runs), Pearson
    and Spearman of the residuals, p by permuting y within each strategy (Monte Carlo)."""
    from scipy import stats
    keep = np.isin(groups, [g for g in set(groups) if (groups == g).sum() >= 2])
    x, y, groups = x[keep], y[keep], groups[keep]  # copies: the callers' arrays are not changed
    out = dict(within_n=int(keep.sum()), within_groups=len(set(groups)), within_pearson=math.nan,
               within_spearman=math.nan, within_p=math.nan)
    if len(x) < 3:
        return out
    members = [np.flatnonzero(groups == g) for g in sorted(set(groups))]
    for idx in members:
        x[idx] -= x[idx].mean()
        y[idx] -= y[idx].mean()
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return out
    rng, obs, hits = np.random.default_rng(seed), abs(float(x @ y)), 0
    for _ in range(WITHIN_PERMUTATIONS):
        yp = y.copy()
        for idx in members:
            yp[idx] = y[rng.permutation(idx)]
        hits += abs(float(x @ yp)) >= obs - 1e-9 * (obs + 1e-12)  # x @ y ∝ r: norms are permutation-invariant
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out.update(within_pearson=float(stats.pearsonr(x, y).statistic),
                   within_spearman=float(stats.spearmanr(x, y).statistic),
                   within_p=(hits + 1) / (WITHIN_PERMUTATIONS + 1))
    return out


def _fmt(x: float, digits: int = 3) -> str:
    return "" if x is None or not math.isfinite(x) else f"{x:.{digits}g}" if abs(x) < 1e-3 else f"{x:.{digits}f}"


def _scatter_grid(df: Any, sharp: list[str], forget: list[str], pairs: list[dict], path: Path) -> None:
    """One scatter panel per (sharpness, forgetting) pair, points coloured by strategy, n and ρ in the title."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    strategies = sorted(df["strategy"].unique())
    colours = {s: f"C{i % 10}" for i, s in enumerate(strategies)}
    fig = Figure(figsize=(3.3 * len(forget), 2.9 * len(sharp)), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(sharp), len(forget), squeeze=False)
    by_pair = {(p["sharpness"], p["metric"]): p for p in pairs}
    for i, s in enumerate(sharp):
        for j, m in enumerate(forget):
            ax, p = axes[i][j], by_pair[(s, m)]
            for strat in strategies:
                sub = df[(df["strategy"] == strat) & df[s].notna() & df[m].notna()]
                ax.scatter(sub[s], sub[m], s=18, color=colours[strat], label=strat)
            within = f", within ρ={_fmt(p['within_spearman'], 2)}" if math.isfinite(p["within_spearman"]) else ""
            ax.set_title(f"n={p['n']}, ρ={_fmt(p['spearman'], 2) or 'n/a'}{within}", fontsize=9)
            ax.set_xlabel(s.removeprefix(PREFIX), fontsize=8)
            ax.set_ylabel(m, fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=min(len(strategies), 5), fontsize=8,
               bbox_to_anchor=(0.5, 1.0))
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)


def correlate(records: Sequence[Path | str | RunRecord], out_dir: Path, n_boot: int = 1000,
              seed: int = 0) -> dict[str, Any]:
    """Spearman (with bootstrap 95% CI) and Pearson correlation of every sharpness scalar with every forgetting
    metric across complete runs; writes correlation.{csv,md,png} and runs.csv under ``out_dir``."""
    import pandas as pd
    from tabulate import tabulate
    recs: list[RunRecord] = []
    paths = [Path(r) for r in records if not isinstance(r, RunRecord)]
    recs += [r for r in records if isinstance(r, RunRecord)]
    recs += [read_record(p) for p in find_records(paths)] if paths else []
    complete = [r for r in recs if r.status == "complete"]
    rows = []
    for r in complete:
        sh = run_sharpness(r)
        if sh:
            rows.append({"stream": r.stream, "strategy": row_label(r.strategy, r.tag), "seed": r.seed, **sh,
                         **{m: _finite(r.metrics.get(m)) for m in FORGETTING_METRICS}})
    if len(rows) < 3:
        raise UserError(f"need at least 3 runs with sharpness, found {len(rows)} among {len(complete)} complete "
                        "records; run with --sharpness cheap")
    df = pd.DataFrame(rows)
    sharp = sorted(c for c in df.columns if c.startswith(PREFIX))
    forget = [m for m in FORGETTING_METRICS if df[m].notna().any()]
    pairs = []
    for s in sharp:
        for m in forget:
            ok = df[s].notna() & df[m].notna()
            x, y = df.loc[ok, s].to_numpy(float), df.loc[ok, m].to_numpy(float)
            pairs.append({"sharpness": s, "metric": m, "expected_sign": FORGETTING_METRICS[m], "n": int(ok.sum()),
                          **_pair_stats(x, y, n_boot, seed),
                          **_within_stats(x, y, df.loc[ok, "strategy"].to_numpy(str), seed)})

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"csv": out_dir / "correlation.csv", "md": out_dir / "correlation.md",
             "png": out_dir / "correlation.png", "runs": out_dir / "runs.csv"}
    atomic_write_text(files["csv"], pd.DataFrame(pairs).to_csv(index=False))
    atomic_write_text(files["runs"], df.to_csv(index=False))
    table = [[p["sharpness"].removeprefix(PREFIX), p["metric"], "+" if p["expected_sign"] > 0 else "−", p["n"],
              f"{_fmt(p['spearman'])} [{_fmt(p['spearman_ci_low'])}, {_fmt(p['spearman_ci_high'])}]"
              if math.isfinite(p["spearman"]) else "n/a (n < 3 or a constant side)",
              _fmt(p["spearman_p"]), _fmt(p["pearson"]), _fmt(p["pearson_p"])] for p in pairs]
    md = tabulate(table, headers=["sharpness", "metric", "claim predicts", "n", "Spearman ρ [95% CI]", "p",
                                  "Pearson r", "p"], tablefmt="github", disable_numparse=True)
    within = tabulate([[p["sharpness"].removeprefix(PREFIX), p["metric"], p["within_n"], p["within_groups"],
                        _fmt(p["within_spearman"]) or "n/a", _fmt(p["within_pearson"]) or "n/a", _fmt(p["within_p"])]
                       for p in pairs], headers=["sharpness", "metric", "n", "strategies", "Spearman ρ", "Pearson r",
                                                 "p"], tablefmt="github", disable_numparse=True)
    streams, strategies = sorted(df["stream"].unique()), sorted(df["strategy"].unique())
    text = (f"# Sharpness vs forgetting\n\n{len(rows)} runs with sharpness ({len(complete) - len(rows)} complete "
            f"runs without it skipped); streams: {', '.join(streams)}; strategies: {', '.join(strategies)}.\n\n"
            "Sharpness is the mean over experiences. The claim predicts ρ > 0 for forgetting and probe_fg, ρ < 0 for "
            f"bwt, probe_retention and probe_loglik_retention. CI: percentile bootstrap over runs ({n_boot} "
            f"resamples, seed {seed}; unreliable for n < 10). p: exact permutation test for n <= {EXACT_P_MAX_N}, "
            "else scipy's t-approximation; per pair, uncorrected for the number of pairs, assuming independent runs."
            "\n\n## Across runs\n\n" + md + "\n\n## Within strategy\n\nAcross strategies, sharpness is confounded "
            "with what a strategy does (SAM flattens by construction). Here each run's sharpness and metric minus "
            "its strategy's mean, over strategies with at least 2 runs (seeds): the correlation that seed-to-seed "
            f"variation alone shows. p (of r): {WITHIN_PERMUTATIONS} random permutations within each strategy.\n\n"
            + within + "\n")
    atomic_write_text(files["md"], text)
    _scatter_grid(df, sharp, forget, pairs, files["png"])
    return {"n_runs": len(rows), "n_skipped": len(complete) - len(rows), "streams": streams,
            "strategies": strategies, "pairs": pairs, "markdown": md, "files": {k: str(v) for k, v in files.items()}}
