"""``clsuite correlate``: correlation of sharpness with forgetting across runs, and within strategies."""
from __future__ import annotations

import itertools
import math
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..atomic import write_text
from ..errors import UserError
from ..metrics import claim_signs
from ..records import RunRecord, finite_or_none, run_sharpness
from ..sharpness import PREFIX
from .leaderboard import read_sources, row_label
from .plots import fmt, scatter_grid

WITHIN_PERMUTATIONS = 10_000  # Monte Carlo permutations (within strategies) for the within-strategy p-value
EXACT_P_MAX_N = 9  # p-values by exact permutation test up to this many runs (n! pairings), else scipy's


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


def correlate(records: Sequence[Path | str | RunRecord], out_dir: Path, n_boot: int = 1000,
              seed: int = 0) -> dict[str, Any]:
    """Spearman (with bootstrap 95% CI) and Pearson correlation of every sharpness scalar with every forgetting
    metric across complete runs (records, files, directories, .zip archives); writes correlation.{csv,md,png} and
    runs.csv under ``out_dir``."""
    import pandas as pd
    from tabulate import tabulate
    signs = claim_signs()  # metric -> sign of its correlation with sharpness that the claim predicts
    recs: list[RunRecord] = []
    paths = [Path(r) for r in records if not isinstance(r, RunRecord)]
    recs += [r for r in records if isinstance(r, RunRecord)]
    recs += [x.record for x in read_sources(paths)] if paths else []
    complete = [r for r in recs if r.status == "complete"]
    rows = []
    for r in complete:
        sh = run_sharpness(r)
        if sh:
            rows.append({"stream": r.stream, "strategy": row_label(r.strategy, r.tag), "seed": r.seed, **sh,
                         **{m: finite_or_none(r.metrics.get(m)) for m in signs}})
    if len(rows) < 3:
        raise UserError(f"need at least 3 runs with sharpness, found {len(rows)} among {len(complete)} complete "
                        "records; run with --sharpness cheap")
    df = pd.DataFrame(rows)
    sharp = sorted(c for c in df.columns if c.startswith(PREFIX))
    forget = [m for m in signs if df[m].notna().any()]
    pairs = []
    for s in sharp:
        for m in forget:
            ok = df[s].notna() & df[m].notna()
            x, y = df.loc[ok, s].to_numpy(float), df.loc[ok, m].to_numpy(float)
            pairs.append({"sharpness": s, "metric": m, "expected_sign": signs[m], "n": int(ok.sum()),
                          **_pair_stats(x, y, n_boot, seed),
                          **_within_stats(x, y, df.loc[ok, "strategy"].to_numpy(str), seed)})

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"csv": out_dir / "correlation.csv", "md": out_dir / "correlation.md",
             "png": out_dir / "correlation.png", "runs": out_dir / "runs.csv"}
    write_text(files["csv"], pd.DataFrame(pairs).to_csv(index=False))
    write_text(files["runs"], df.to_csv(index=False))
    table = [[p["sharpness"].removeprefix(PREFIX), p["metric"], "+" if p["expected_sign"] > 0 else "−", p["n"],
              f"{fmt(p['spearman'])} [{fmt(p['spearman_ci_low'])}, {fmt(p['spearman_ci_high'])}]"
              if math.isfinite(p["spearman"]) else "n/a (n < 3 or a constant side)",
              fmt(p["spearman_p"]), fmt(p["pearson"]), fmt(p["pearson_p"])] for p in pairs]
    md = tabulate(table, headers=["sharpness", "metric", "claim predicts", "n", "Spearman ρ [95% CI]", "p",
                                  "Pearson r", "p"], tablefmt="github", disable_numparse=True)
    within = tabulate([[p["sharpness"].removeprefix(PREFIX), p["metric"], p["within_n"], p["within_groups"],
                        fmt(p["within_spearman"]) or "n/a", fmt(p["within_pearson"]) or "n/a", fmt(p["within_p"])]
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
    write_text(files["md"], text)
    scatter_grid(df, sharp, forget, pairs, files["png"], PREFIX)
    return {"n_runs": len(rows), "n_skipped": len(complete) - len(rows), "streams": streams,
            "strategies": strategies, "pairs": pairs, "markdown": md, "files": {k: str(v) for k, v in files.items()}}
