"""Continual-learning metrics over the task-score matrix R and the probe-score matrix P, each registered once with
its formula and direction (definitions and differences from Avalanche: docs/metrics.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .errors import UserError
from .registry import Registry

__all__ = ["Metric", "METRICS", "register_metric", "shown_metrics", "claim_signs", "compute_metrics"]

MetricFn = Callable[[np.ndarray, np.ndarray | None], float | None]


@dataclass(frozen=True)
class Metric:
    """A named metric over (R, P): its formula, which direction is better, whether leaderboard tables show it, and
    the sign of its correlation with sharpness that the sharpness-forgetting claim predicts (None: no claim)."""

    name: str
    fn: MetricFn
    higher_is_better: bool
    formula: str
    shown: bool = False
    claim_sign: int | None = None
    on: str = "scores"  # "loglik": fn gets the gold log-likelihood matrix L in place of P

    def __post_init__(self) -> None:
        if self.claim_sign not in (1, -1, None):
            raise ValueError(f"metric {self.name!r}: claim_sign must be +1, -1 or None, got {self.claim_sign!r}")
        if self.on not in ("scores", "loglik"):
            raise ValueError(f"metric {self.name!r}: on must be 'scores' or 'loglik', got {self.on!r}")
        if not self.formula or "\n" in self.formula:
            raise ValueError(f"metric {self.name!r}: give its formula on one line")

    def __call__(self, R: np.ndarray, P: np.ndarray | None) -> float | None:
        return self.fn(R, P)


# Built-ins first, in the order leaderboards list them; entry points (group clsuite.metrics) follow.
METRICS: Registry[Metric] = Registry("metric", "clsuite.metrics", instance_of=Metric, sort=False)


def register_metric(name: str, *, higher_is_better: bool, formula: str, shown: bool = False,
                    claim_sign: int | None = None, on: str = "scores") -> Callable[[MetricFn], Metric]:
    """Decorator: ``@register_metric("x", higher_is_better=True, formula="...")`` on ``fn(R, P) -> float | None``
    registers it and returns the ``Metric`` (still callable as ``fn``)."""

    def wrap(fn: MetricFn) -> Metric:
        m = Metric(name, fn, higher_is_better, formula, shown, claim_sign, on)
        return METRICS.register(name, m, origin=fn.__module__)

    return wrap


def shown_metrics() -> list[str]:
    """Names of the metrics that leaderboard tables show, in registry order."""
    return [n for n, m in METRICS.items() if m.shown]


def claim_signs() -> dict[str, int]:
    """Metric name -> the sign of its correlation with sharpness that the sharpness claim predicts."""
    return {n: m.claim_sign for n, m in METRICS.items() if m.claim_sign is not None}


@register_metric("acc", higher_is_better=True, shown=True, formula="average final score: mean_c R[T, c]")
def _acc(R: np.ndarray, P: np.ndarray | None) -> float:
    return float(R[-1].mean())


@register_metric("bwt", higher_is_better=True, shown=True, claim_sign=-1,
                 formula="backward transfer: mean_{c<T-1} (R[T, c] - R[c+1, c]); < 0 is forgetting")
def _bwt(R: np.ndarray, P: np.ndarray | None) -> float | None:
    T = R.shape[1]
    if T < 2:
        return None
    c = np.arange(T - 1)
    return float((R[T, c] - R[c + 1, c]).mean())


@register_metric("fwt", higher_is_better=True, shown=True,
                 formula="forward transfer: mean_{c>=1} (R[c, c] - R[0, c]), reference = initial model")
def _fwt(R: np.ndarray, P: np.ndarray | None) -> float | None:
    T = R.shape[1]
    if T < 2:
        return None
    c = np.arange(1, T)
    return float((R[c, c] - R[0, c]).mean())


@register_metric("forgetting", higher_is_better=False, shown=True, claim_sign=+1,
                 formula="mean_{c<T-1} (max_{c<i<T} R[i, c] - R[T, c]), Chaudhry 2018")
def _forgetting(R: np.ndarray, P: np.ndarray | None) -> float | None:
    T = R.shape[1]
    if T < 2:
        return None
    return float(np.mean([R[c + 1 : T, c].max() - R[T, c] for c in range(T - 1)]))


@register_metric("plasticity", higher_is_better=True, shown=True,
                 formula="learning accuracy: mean_c R[c+1, c], score right after learning")
def _plasticity(R: np.ndarray, P: np.ndarray | None) -> float:
    T = R.shape[1]
    return float(R[np.arange(1, T + 1), np.arange(T)].mean())


def _has_probes(P: np.ndarray | None) -> bool:
    return P is not None and P.shape[1] > 0


@register_metric("probe_retention", higher_is_better=True, shown=True, claim_sign=-1,
                 formula="delta AVG: mean_p (P[T, p] - P[0, p]); < 0 is forgetting")
def _probe_retention(R: np.ndarray, P: np.ndarray | None) -> float | None:
    return float((P[-1] - P[0]).mean()) if _has_probes(P) else None


register_metric("probe_loglik_retention", higher_is_better=True, shown=True, claim_sign=-1, on="loglik",
                formula="mean_p (L[T, p] - L[0, p]): change of the gold answer's log-likelihood on the probes")(
    _probe_retention.fn)


@register_metric("probe_fg", higher_is_better=False, shown=True, claim_sign=+1,
                 formula="relative forgetting: mean_{p, m>=1} (P[0, p] - P[m, p]) / |P[0, p]| * 100, "
                         "skipping P[0, p] = 0")
def _probe_fg(R: np.ndarray, P: np.ndarray | None) -> float | None:
    """Luo et al. 2023 FG, with |P[0, p]| as denominator so a positive FG means forgetting for negative scores too."""
    if not _has_probes(P):
        return None
    keep = P[0] != 0
    if not keep.any():
        return None
    base = P[0, keep]
    return float(((base - P[1:, keep]) / np.abs(base) * 100).mean())


@register_metric("probe_avg_final", higher_is_better=True, formula="mean_p P[T, p]")
def _probe_avg_final(R: np.ndarray, P: np.ndarray | None) -> float | None:
    return float(P[-1].mean()) if _has_probes(P) else None


@register_metric("probe_avg_initial", higher_is_better=True, formula="mean_p P[0, p]")
def _probe_avg_initial(R: np.ndarray, P: np.ndarray | None) -> float | None:
    return float(P[0].mean()) if _has_probes(P) else None


def _matrix(x: Any, name: str) -> np.ndarray:
    """Convert x to a finite 2-D float array or raise UserError naming the problem."""
    try:
        a = np.asarray(x, dtype=float)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be a rectangular matrix of numbers (rows of equal length)") from None
    if a.ndim != 2:
        raise UserError(f"{name} must be a 2-D matrix, got {a.ndim} dimension(s) with shape {a.shape}")
    if not np.isfinite(a).all():
        row, col = (int(i) for i in np.argwhere(~np.isfinite(a))[0])
        raise UserError(f"{name} contains NaN or infinite values, first at row {row}, column {col}")
    return a


def compute_metrics(R: Any, P: Any = None, L: Any = None) -> dict[str, float | None]:
    """Compute every metric in METRICS from task scores R, (T+1) x T, optional probe scores P, (T+1) x K, and
    optional probe gold log-likelihoods L, (T+1) x K'."""
    R = _matrix(R, "R")
    T = R.shape[1]
    if T < 1 or R.shape[0] != T + 1:
        raise UserError(
            f"R must have T+1 rows (row 0 = before training) and T >= 1 task columns, got shape {R.shape}"
        )
    given = {"scores": P, "loglik": L}
    for key, name in (("scores", "P"), ("loglik", "L")):
        if given[key] is not None:
            given[key] = _matrix(given[key], name)
            if given[key].shape[0] != T + 1:
                raise UserError(f"{name} must have {T + 1} rows like R (row 0 = before training), "
                                f"got shape {given[key].shape}")
    return {name: m.fn(R, given[m.on]) for name, m in METRICS.items()}
