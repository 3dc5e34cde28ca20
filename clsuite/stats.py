"""Statistics of the benchmark protocol: t intervals over seeds, paired tests, Holm, power, two-way bootstrap."""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import optimize, stats

Run = Mapping[str, np.ndarray]  # {name: per-item scores of shape (rows, n_items)}


@dataclass(frozen=True)
class Interval:
    """A mean with its interval [lo, hi] over n values (lo = hi = nan where there is no interval)."""

    mean: float
    lo: float
    hi: float
    n: int

    @property
    def half_width(self) -> float:
        """Half the interval's width (nan without an interval)."""
        return (self.hi - self.lo) / 2


@dataclass(frozen=True)
class Paired:
    """A paired comparison: mean difference, its t interval [lo, hi], two-sided p-value, n pairs, sd of differences."""

    mean: float
    lo: float
    hi: float
    p: float
    n: int
    sd: float


def _values(x: Sequence[float], what: str = "x") -> np.ndarray:
    a = np.asarray(x, dtype=float).ravel()
    if a.size == 0:
        raise ValueError(f"{what} is empty; pass at least one value")
    if np.isnan(a).any():
        raise ValueError(f"{what} holds NaN; drop failed runs before computing statistics")
    return a


def _check_level(level: float) -> None:
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level!r}")


def t_interval(x: Sequence[float], level: float = 0.95) -> Interval:
    """Mean of ``x`` (one value per seed) with its Student t interval at ``level``."""
    _check_level(level)
    a = _values(x)
    n, mean = a.size, float(a.mean())
    if n == 1:
        return Interval(mean, math.nan, math.nan, 1)
    half = float(stats.t.ppf((1 + level) / 2, n - 1) * a.std(ddof=1) / math.sqrt(n))
    return Interval(mean, mean - half, mean + half, n)


def t_half_width(sd: float, n: int, level: float = 0.95) -> float:
    """Half-width of the Student t interval of a mean of ``n`` values with standard deviation ``sd`` (nan: n < 2)."""
    return float(stats.t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n)) if n > 1 else math.nan


def paired_test(x: Sequence[float], y: Sequence[float], level: float = 0.95) -> Paired:
    """Paired t test of ``x - y`` (paired by position/seed): mean difference, t interval, two-sided p-value."""
    a, b = _values(x, "x"), _values(y, "y")
    if a.size != b.size:
        raise ValueError(f"x and y must be paired: got {a.size} and {b.size} values")
    d = a - b
    ci, n = t_interval(d, level), d.size
    sd = float(d.std(ddof=1)) if n > 1 else math.nan
    tol = 1e-12 * max(1.0, float(np.abs(a).max()), float(np.abs(b).max()))  # rounding noise of the subtraction
    if n < 2:
        p = math.nan
    elif np.ptp(d) <= tol:  # all differences identical: t is 0/0 or +-inf
        p = 1.0 if abs(ci.mean) <= tol else 0.0
    else:
        p = float(2 * stats.t.sf(abs(ci.mean) / (sd / math.sqrt(n)), n - 1))
    return Paired(ci.mean, ci.lo, ci.hi, p, n, sd)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values in the original order; nan stays nan and is not counted in the family."""
    p = np.asarray(pvalues, dtype=float).ravel()
    if ((p < 0) | (p > 1)).any():
        raise ValueError("p-values must lie in [0, 1]")
    out = np.full(p.shape, math.nan)
    idx = np.flatnonzero(~np.isnan(p))
    order, m = idx[np.argsort(p[idx], kind="stable")], idx.size
    out[order] = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    return out.tolist()


def min_detectable_effect(sd: float, n: int, alpha: float = 0.05, power: float = 0.8, m: int = 1) -> float:
    """Smallest true mean difference a two-sided paired t test at level alpha/m detects with ``power`` (n pairs)."""
    if sd < 0 or not 0 < alpha < 1 or not 0 < power < 1 or m < 1:
        raise ValueError(f"need sd >= 0, alpha and power in (0, 1), m >= 1; got {sd=}, {alpha=}, {power=}, {m=}")
    if n < 2:
        return math.inf
    if sd == 0:
        return 0.0
    df, a = n - 1, alpha / m
    crit = stats.t.ppf(1 - a / 2, df)

    def shortfall(nc: float) -> float:
        # lower tail as sf at -nc: scipy's nct.cdf far in the tail can return nan
        return float(stats.nct.sf(crit, df, nc) + stats.nct.sf(crit, df, -nc)) - power

    if shortfall(0.0) >= 0:  # the test's size alone reaches the power
        return 0.0
    hi = 1.0
    while shortfall(hi) < 0:
        hi *= 2
    return optimize.brentq(shortfall, 0.0, hi, xtol=1e-10) * sd / math.sqrt(n)


def _stack(runs: Sequence[Run], names: list[str]) -> dict[str, np.ndarray]:
    """{name: array (runs, rows, items)}, checking every run has the same names and shapes."""
    out, other = {}, next((sorted(run) for run in runs if sorted(run) != names), None)
    if other is not None:
        raise ValueError(f"runs hold different names: {other} vs {names}; compare runs of one stream")
    for name in names:
        arrays = [np.asarray(run[name], dtype=float) for run in runs]
        if any(a.ndim != 2 or a.shape[1] == 0 for a in arrays):
            raise ValueError(f"{name!r}: per-item scores must have shape (rows, n_items), n_items >= 1")
        if len({a.shape[1] for a in arrays}) > 1:
            raise ValueError(f"{name!r}: item count differs between runs; compared runs must share their items")
        if len({a.shape[0] for a in arrays}) > 1:
            raise ValueError(f"{name!r}: row count differs between runs; compare runs of one stream")
        out[name] = np.stack(arrays)
    return out


def two_way_bootstrap(runs_a: Sequence[Run], runs_b: Sequence[Run] | None = None, *,
                      metric: Callable[[dict[str, np.ndarray]], float], n_boot: int = 2000, level: float = 0.95,
                      seed: int = 0, resample_seeds: bool = True) -> Interval:
    """Percentile interval of the mean metric over runs (of the mean paired difference a - b with ``runs_b``),
    resampling items (shared by all runs and rows) and, with ``resample_seeds``, runs."""
    _check_level(level)
    if not runs_a or (runs_b is not None and len(runs_b) != len(runs_a)) or n_boot < 1:
        raise ValueError("need at least one run, runs_b (if given) paired with runs_a (as many runs), n_boot >= 1")
    runs, names, n = list(runs_a) + list(runs_b or []), sorted(runs_a[0]), len(runs_a)
    scores = _stack(runs, names)
    rng = np.random.default_rng(seed)
    # A replicate's item draw as counts per item: resampled means = scores @ counts / n_items, one matmul per name.
    boot, orig = {}, {}
    for name in names:
        k = scores[name].shape[2]
        draw = rng.integers(0, k, size=(n_boot, k)) + k * np.arange(n_boot)[:, None]
        counts = np.bincount(draw.ravel(), minlength=n_boot * k).reshape(n_boot, k)
        boot[name] = np.stack([(run @ counts.T).T / k for run in scores[name]])  # (runs, boot, rows), run by run
        orig[name] = scores[name].mean(axis=2)  # (runs, rows)
    vals = np.array([[metric({nm: boot[nm][r, b] for nm in names}) for b in range(n_boot)] for r in range(len(runs))])
    base = np.array([metric({nm: orig[nm][r] for nm in names}) for r in range(len(runs))], dtype=float)
    if runs_b is not None:
        vals, base = vals[:n] - vals[n:], base[:n] - base[n:]
    seeds = rng.integers(0, n, size=(n_boot, n)) if resample_seeds else np.broadcast_to(np.arange(n), (n_boot, n))
    reps = vals[seeds, np.arange(n_boot)[:, None]].mean(axis=1)  # replicate b: its drawn runs at item draw b
    lo, hi = np.quantile(reps, [(1 - level) / 2, (1 + level) / 2])
    return Interval(float(base.mean()), float(lo), float(hi), n)
