"""Continual-learning metrics over a task-score matrix R and a probe-score matrix P.

R has rows 0..T and columns 0..T-1 (0-based task c): R[i, c] is the score on task c after training
through task i (1-based), row 0 is the model before the stream, so task c is learned at row c + 1.
P has the same rows and one column per probe (held-out general-ability sets, never trained on).
L, when given, is like P but holds the mean log-likelihood of the gold answer of each multiple-choice probe:
a continuous signal that moves before accuracy does (metrics with ``on="loglik"`` read it).
Scores may be on any scale (accuracy, exact match, log-likelihood); differences keep that scale.
probe_fg divides by |P[0, p]| so that FG > 0 means forgetting even for negative (log-likelihood) scores;
probes with P[0, p] == 0 are skipped, and FG is None when none remain.

Differences from avalanche-lib 0.6.0 (checked in tests/test_metrics.py by replaying R through its
StreamAccuracy / StreamForgetting / StreamBWT / StreamForwardTransfer plugins, one eval after init
and one after each experience):
- acc: Avalanche's StreamAccuracy pools all patterns of the stream (micro average); ours is the
  unweighted mean over tasks. They agree when every task's eval set has the same size.
- forgetting: Avalanche's is R[c+1, c] - R[T, c] (score right after learning minus last score),
  ours takes the max over rows c+1..T-1 (Chaudhry et al. 2018), so ours >= Avalanche's, equal when
  no task peaks after the step that learned it. Both average over the T-1 tasks learned before the
  last one.
- bwt: Avalanche's StreamBWT is minus its forgetting, which is exactly Lopez-Paz & Ranzato's BWT:
  identical to ours.
- fwt: Avalanche's StreamForwardTransfer is mean_{c>=1} (R[c, c] - R[0, c]) with R[0] its eval at
  initialisation: identical to ours when that eval exists (it needs eval_every > -1).
- T = 1: Avalanche reports 0.0 for forgetting, BWT and FWT (an empty Mean); we report None.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .errors import UserError

__all__ = ["Metric", "METRICS", "compute_metrics"]


@dataclass(frozen=True)
class Metric:
    """A named metric over (R, P) that knows which direction is better."""

    name: str
    fn: Callable[[np.ndarray, np.ndarray | None], float | None]
    higher_is_better: bool
    description: str
    on: str = "scores"  # "loglik": fn gets the gold log-likelihood matrix L in place of P


def _acc(R: np.ndarray, P: np.ndarray | None) -> float:
    return float(R[-1].mean())


def _plasticity(R: np.ndarray, P: np.ndarray | None) -> float:
    T = R.shape[1]
    return float(R[np.arange(1, T + 1), np.arange(T)].mean())


def _bwt(R: np.ndarray, P: np.ndarray | None) -> float | None:
    T = R.shape[1]
    if T < 2:
        return None
    c = np.arange(T - 1)
    return float((R[T, c] - R[c + 1, c]).mean())


def _fwt(R: np.ndarray, P: np.ndarray | None) -> float | None:
    T = R.shape[1]
    if T < 2:
        return None
    c = np.arange(1, T)
    return float((R[c, c] - R[0, c]).mean())


def _forgetting(R: np.ndarray, P: np.ndarray | None) -> float | None:
    T = R.shape[1]
    if T < 2:
        return None
    return float(np.mean([R[c + 1 : T, c].max() - R[T, c] for c in range(T - 1)]))


def _has_probes(P: np.ndarray | None) -> bool:
    return P is not None and P.shape[1] > 0


def _probe_retention(R: np.ndarray, P: np.ndarray | None) -> float | None:
    return float((P[-1] - P[0]).mean()) if _has_probes(P) else None


def _probe_fg(R: np.ndarray, P: np.ndarray | None) -> float | None:
    """Luo et al. 2023 FG, with |P[0, p]| as denominator so a positive FG means forgetting for negative scores too."""
    if not _has_probes(P):
        return None
    keep = P[0] != 0
    if not keep.any():
        return None
    base = P[0, keep]
    return float(((base - P[1:, keep]) / np.abs(base) * 100).mean())


def _probe_avg_final(R: np.ndarray, P: np.ndarray | None) -> float | None:
    return float(P[-1].mean()) if _has_probes(P) else None


def _probe_avg_initial(R: np.ndarray, P: np.ndarray | None) -> float | None:
    return float(P[0].mean()) if _has_probes(P) else None


_FG = "relative forgetting: mean_{p, m>=1} (P[0, p] - P[m, p]) / |P[0, p]| * 100, skipping P[0, p] = 0"

METRICS: dict[str, Metric] = {
    m.name: m
    for m in [
        Metric("acc", _acc, True, "average final score: mean_c R[T, c]"),
        Metric("bwt", _bwt, True, "backward transfer: mean_{c<T-1} (R[T, c] - R[c+1, c]); < 0 is forgetting"),
        Metric("fwt", _fwt, True, "forward transfer: mean_{c>=1} (R[c, c] - R[0, c]), reference = initial model"),
        Metric("forgetting", _forgetting, False, "mean_{c<T-1} (max_{c<i<T} R[i, c] - R[T, c]), Chaudhry 2018"),
        Metric("plasticity", _plasticity, True, "learning accuracy: mean_c R[c+1, c], score right after learning"),
        Metric("probe_retention", _probe_retention, True, "delta AVG: mean_p (P[T, p] - P[0, p]); < 0 is forgetting"),
        Metric("probe_loglik_retention", _probe_retention, True,
               "mean_p (L[T, p] - L[0, p]): change of the gold answer's log-likelihood on the probes", on="loglik"),
        Metric("probe_fg", _probe_fg, False, _FG),
        Metric("probe_avg_final", _probe_avg_final, True, "mean_p P[T, p]"),
        Metric("probe_avg_initial", _probe_avg_initial, True, "mean_p P[0, p]"),
    ]
}


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
