"""Tests for clsuite.metrics: hand-computed values, a cross-check against avalanche-lib 0.6.0, bad inputs."""

from __future__ import annotations

import re
from types import SimpleNamespace

import numpy as np
import pytest

from clsuite.errors import UserError
from clsuite.metrics import METRICS, compute_metrics

# Rows 0..T (row 0 = before training), columns = tasks; task c (0-based) is learned at row c + 1.
# All scores are multiples of 0.05 so they replay exactly as accuracies over 20 (or 40) patterns.
A = [  # no task peaks after the step that learned it: max == just-after-learning
    [0.10, 0.20, 0.30],
    [0.80, 0.35, 0.25],
    [0.60, 0.90, 0.40],
    [0.50, 0.70, 0.85],
]
B = [  # task 0 peaks at row 2 (0.90), after it was learned at row 1 (0.60)
    [0.10, 0.20, 0.30],
    [0.60, 0.35, 0.25],
    [0.90, 0.70, 0.40],
    [0.50, 0.65, 0.80],
]
C = [  # T = 4: task 0 peaks at row 2 (0.8 > 0.5), task 1 at row 3 (0.7 > 0.6)
    [0.0, 0.1, 0.2, 0.3],
    [0.5, 0.2, 0.2, 0.3],
    [0.8, 0.6, 0.3, 0.3],
    [0.6, 0.7, 0.9, 0.4],
    [0.4, 0.5, 0.7, 1.0],
]
P_A = [  # two probes for A
    [50.0, 40.0],
    [48.0, 42.0],
    [45.0, 40.0],
    [47.0, 36.0],
]

# Hand-computed expectations.
EXPECTED = {
    "A": {
        "acc": (0.50 + 0.70 + 0.85) / 3,  # 0.68333
        "plasticity": (0.80 + 0.90 + 0.85) / 3,  # 0.85
        "bwt": ((0.50 - 0.80) + (0.70 - 0.90)) / 2,  # -0.25
        "fwt": ((0.35 - 0.20) + (0.40 - 0.30)) / 2,  # 0.125
        "forgetting": ((0.80 - 0.50) + (0.90 - 0.70)) / 2,  # 0.25 (max(0.8, 0.6) = 0.8)
    },
    "B": {
        "acc": (0.50 + 0.65 + 0.80) / 3,  # 0.65
        "plasticity": (0.60 + 0.70 + 0.80) / 3,  # 0.70
        "bwt": ((0.50 - 0.60) + (0.65 - 0.70)) / 2,  # -0.075
        "fwt": ((0.35 - 0.20) + (0.40 - 0.30)) / 2,  # 0.125
        "forgetting": ((0.90 - 0.50) + (0.70 - 0.65)) / 2,  # 0.225: the max picks 0.9, not 0.6
    },
    "C": {
        "acc": (0.4 + 0.5 + 0.7 + 1.0) / 4,  # 0.65
        "plasticity": (0.5 + 0.6 + 0.9 + 1.0) / 4,  # 0.75
        "bwt": ((0.4 - 0.5) + (0.5 - 0.6) + (0.7 - 0.9)) / 3,  # -0.13333
        "fwt": ((0.2 - 0.1) + (0.3 - 0.2) + (0.4 - 0.3)) / 3,  # 0.1
        "forgetting": ((0.8 - 0.4) + (0.7 - 0.5) + (0.9 - 0.7)) / 3,  # 0.26667
    },
}
MATRICES = {"A": A, "B": B, "C": C}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_task_metrics_by_hand(name: str) -> None:
    got = compute_metrics(MATRICES[name])
    for key, want in EXPECTED[name].items():
        assert got[key] == pytest.approx(want), key
    assert all(got[k] is None for k in ("probe_retention", "probe_fg", "probe_avg_final", "probe_avg_initial"))


def test_forgetting_max_matters() -> None:
    """In B task 0 peaks after it was learned: forgetting uses the peak, so it exceeds -BWT by (0.9 - 0.6) / 2."""
    got = compute_metrics(B)
    assert got["forgetting"] - (-got["bwt"]) == pytest.approx((0.90 - 0.60) / 2)
    assert compute_metrics(A)["forgetting"] == pytest.approx(-compute_metrics(A)["bwt"])


def test_probe_metrics_by_hand() -> None:
    got = compute_metrics(A, P_A)
    assert got["probe_retention"] == pytest.approx(((47 - 50) + (36 - 40)) / 2)  # -3.5
    assert got["probe_avg_final"] == pytest.approx((47 + 36) / 2)  # 41.5
    assert got["probe_avg_initial"] == pytest.approx((50 + 40) / 2)  # 45.0
    # probe 0: 4, 10, 6 percent; probe 1: -5, 0, 10 percent; mean over 6 terms
    assert got["probe_fg"] == pytest.approx((4 + 10 + 6 - 5 + 0 + 10) / 6)  # 4.1667


def test_probe_fg_skips_zero_baseline_and_uses_abs() -> None:
    R = [[0.2], [0.7]]
    assert compute_metrics(R, [[0.0, 40.0], [5.0, 30.0]])["probe_fg"] == pytest.approx(25.0)
    assert compute_metrics(R, [[0.0], [5.0]])["probe_fg"] is None
    # log-likelihood scores: -2.0 -> -2.5 is a drop, so FG must be positive (+25), not -25
    assert compute_metrics(R, [[-2.0], [-2.5]])["probe_fg"] == pytest.approx(25.0)
    assert compute_metrics(R, [[-2.0], [-2.5]])["probe_retention"] == pytest.approx(-0.5)


def test_probe_zero_columns_gives_none() -> None:
    got = compute_metrics(A, np.empty((4, 0)))
    assert all(got[k] is None for k in ("probe_retention", "probe_fg", "probe_avg_final", "probe_avg_initial"))


def test_single_task() -> None:
    got = compute_metrics([[0.2], [0.7]])
    assert got["acc"] == pytest.approx(0.7) and got["plasticity"] == pytest.approx(0.7)
    assert got["bwt"] is None and got["fwt"] is None and got["forgetting"] is None


def test_registry_and_plain_floats() -> None:
    assert METRICS.names()[:8] == ["acc", "bwt", "fwt", "forgetting", "plasticity", "probe_retention",
                                   "probe_loglik_retention", "probe_fg"]
    assert not METRICS.get("forgetting").higher_is_better and not METRICS.get("probe_fg").higher_is_better
    assert METRICS.get("acc").higher_is_better and METRICS.get("bwt").higher_is_better
    assert all(m.formula and "\n" not in m.formula for _, m in METRICS.items())
    got = compute_metrics(np.array(A), np.array(P_A), np.array(P_A) - 5)
    assert list(got) == METRICS.names()
    assert all(type(v) is float for v in got.values())


def test_loglik_metrics_read_the_loglik_matrix() -> None:
    L = [[-5.0, -2.0], [-6.0, -2.5], [-6.5, -3.0], [-7.0, -2.0]]
    got = compute_metrics(A, P_A, L)
    assert got["probe_loglik_retention"] == pytest.approx(((-7.0 + 5.0) + (-2.0 + 2.0)) / 2)
    assert got["probe_retention"] == compute_metrics(A, P_A)["probe_retention"]  # P, not L
    assert compute_metrics(A, P_A)["probe_loglik_retention"] is None
    with pytest.raises(UserError, match="L must have 4 rows"):
        compute_metrics(A, P_A, L[:2])


@pytest.mark.parametrize(
    "R, P, fragment",
    [
        ([[0.1, 0.2], [0.3, 0.4]], None, "T+1 rows"),  # square, missing the before-training row
        ([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6], [0.7, 0.8]], None, "T+1 rows"),  # too many rows
        ([[]], None, "T+1 rows"),  # no tasks
        ([0.1, 0.2], None, "2-D"),
        ([[0.1], [0.2, 0.3]], None, "rectangular"),
        ([["a"], ["b"]], None, "rectangular"),
        ([[0.1], [float("nan")]], None, "NaN"),
        ([[0.1], [float("inf")]], None, "NaN"),
        ([[0.1], [0.2]], [[1.0]], "P must have 2 rows"),
        ([[0.1], [0.2]], [[1.0], [float("nan")]], "P contains NaN"),
    ],
)
def test_bad_inputs_raise_user_error(R, P, fragment: str) -> None:
    with pytest.raises(UserError, match=re.escape(fragment)):
        compute_metrics(R, P)


# ---------------------------------------------------------------------------------------------
# Cross-check against avalanche-lib 0.6.0's own metric code.
#
# Avalanche's plugins are replayed as a CL run would drive them: one eval of the whole stream at
# initialisation (row 0), then for each experience i: before_training_exp, then an eval of every
# experience (row i + 1). Each eval of experience c is one minibatch whose accuracy is exactly R[i][c].
# What the replay shows (see also the module docstring of clsuite.metrics):
# - StreamForgetting = mean over c < T-1 of (R[c+1][c] - R[T][c]): "initial" is the eval while c was the
#   experience just trained, "last" the latest eval; the last-trained experience has no "last" (reset
#   at each eval) and is left out. No max over intermediate rows, unlike Chaudhry et al.
# - StreamBWT = -StreamForgetting = Lopez-Paz & Ranzato's BWT over the same T-1 tasks: equals ours.
# - StreamForwardTransfer = mean over c >= 1 of (R[c][c] - R[0][c]) (eval after experience c-1 minus eval
#   at init): equals our FWT.
# - StreamAccuracy pools patterns over the stream: equals our (per-task) ACC only for equal-size tasks.
# - With T = 1 avalanche returns 0.0 (mean of nothing) where we return None.
# ---------------------------------------------------------------------------------------------

N = 20  # patterns per experience


@pytest.fixture(scope="module")
def av():
    """avalanche's metric modules (slow import, so only loaded for the cross-check tests)."""
    metrics = pytest.importorskip("avalanche.evaluation.metrics")
    return metrics


def _minibatch(score: float, n: int) -> tuple:
    """Labels and logits whose accuracy is exactly `score` over n patterns."""
    import torch

    k = round(score * n)
    assert abs(k - score * n) < 1e-9, "score must be a multiple of 1/n"
    logits = torch.zeros(n, 2)
    logits[:k, 0] = 1.0  # predicts class 0 (correct)
    logits[k:, 1] = 1.0  # predicts class 1 (wrong)
    return torch.zeros(n, dtype=torch.long), logits


def _replay(R, plugins, sizes=None) -> list:
    """Drive avalanche plugin metrics through evals at init and after each experience; return their results."""
    R = np.asarray(R)
    T = R.shape[1]
    sizes = sizes or [N] * T
    exp = [SimpleNamespace(current_experience=c, origin_stream=SimpleNamespace(name="test"), task_labels=[0]) for c in range(T)]
    s = SimpleNamespace(is_eval=False, eval_every=0, clock=SimpleNamespace(train_iterations=0), experience=None)
    for i in range(T + 1):
        if i > 0:
            s.is_eval, s.experience = False, exp[i - 1]
            s.clock.train_iterations += 10
            for p in plugins:
                p.before_training_exp(s)
        s.is_eval = True
        for p in plugins:
            p.before_eval(s)
        for c in range(T):
            s.experience = exp[c]
            s.mb_y, s.mb_output = _minibatch(float(R[i, c]), sizes[c])
            s.mb_task_id = 0
            for p in plugins:
                p.before_eval_exp(s)
                p.after_eval_iteration(s)
                p.after_eval_exp(s)
        for p in plugins:
            p.after_eval(s)
    return [p.result() for p in plugins]


def _avalanche_stream(av, R, sizes=None) -> dict[str, float]:
    acc, fg, bwt, fwt = _replay(
        R, [av.StreamAccuracy(), av.StreamForgetting(), av.StreamBWT(), av.StreamForwardTransfer()], sizes
    )
    return {"acc": acc, "forgetting": fg, "bwt": bwt, "fwt": fwt}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["A", "B", "C"])
def test_avalanche_acc_bwt_fwt_coincide(av, name: str) -> None:
    """ACC (equal-size tasks), BWT and FWT have the same definition in avalanche and here."""
    ours, theirs = compute_metrics(MATRICES[name]), _avalanche_stream(av, MATRICES[name])
    for key in ("acc", "bwt", "fwt"):
        assert ours[key] == pytest.approx(theirs[key]), key


@pytest.mark.slow
def test_avalanche_forgetting_equal_without_late_peak(av) -> None:
    """In A no task peaks after being learned, so max == just-after-learning: forgetting equals avalanche's (0.25)."""
    assert compute_metrics(A)["forgetting"] == pytest.approx(_avalanche_stream(av, A)["forgetting"])
    assert _avalanche_stream(av, A)["forgetting"] == pytest.approx(0.25)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, theirs",
    [
        ("B", ((0.60 - 0.50) + (0.70 - 0.65)) / 2),  # 0.075 vs ours 0.225
        ("C", ((0.5 - 0.4) + (0.6 - 0.5) + (0.9 - 0.7)) / 3),  # 0.1333 vs ours 0.2667
    ],
)
def test_avalanche_forgetting_lower_with_late_peak(av, name: str, theirs: float) -> None:
    """Avalanche's forgetting is R[c+1][c] - R[T][c] (no max), so with a late peak ours is strictly larger."""
    got = _avalanche_stream(av, MATRICES[name])
    assert got["forgetting"] == pytest.approx(theirs)
    assert got["forgetting"] == pytest.approx(-got["bwt"])  # avalanche's BWT is minus its forgetting
    assert compute_metrics(MATRICES[name])["forgetting"] > got["forgetting"] + 0.1


@pytest.mark.slow
def test_avalanche_acc_is_pattern_weighted(av) -> None:
    """StreamAccuracy pools patterns: with task sizes 20/40/20 it is (10 + 28 + 17) / 80, not the task mean."""
    theirs = _avalanche_stream(av, A, sizes=[20, 40, 20])["acc"]
    assert theirs == pytest.approx((0.50 * 20 + 0.70 * 40 + 0.85 * 20) / 80)  # 0.6875
    assert compute_metrics(A)["acc"] == pytest.approx((0.50 + 0.70 + 0.85) / 3)  # 0.68333


@pytest.mark.slow
def test_avalanche_single_task_reports_zero(av) -> None:
    """With T = 1 avalanche averages nothing and reports 0.0; we report None (undefined)."""
    got = _avalanche_stream(av, [[0.2], [0.7]])
    assert got == {"acc": pytest.approx(0.7), "forgetting": 0.0, "bwt": 0.0, "fwt": 0.0}
    assert compute_metrics([[0.2], [0.7]])["forgetting"] is None


@pytest.mark.slow
def test_avalanche_standalone_per_task(av) -> None:
    """The standalone Forgetting / BWT / ForwardTransfer classes, fed B as the plugins feed them, per task."""
    R = np.asarray(B)
    T = R.shape[1]
    fg, bwt, fwt = av.Forgetting(), av.BWT(), av.ForwardTransfer()
    for c in range(T):
        fwt.update(c, R[0, c], initial=True)  # eval at initialisation
    for i in range(1, T + 1):  # eval after training experience i - 1
        fg.reset_last()
        bwt.reset_last()
        for c in range(T):
            fg.update(c, R[i, c], initial=(c == i - 1))
            bwt.update(c, R[i, c], initial=(c == i - 1))
            if c == i:
                fwt.update(c, R[i, c])
    assert fg.result() == pytest.approx({0: 0.60 - 0.50, 1: 0.70 - 0.65})  # ours per task: {0: 0.40, 1: 0.05}
    assert bwt.result() == pytest.approx({0: 0.50 - 0.60, 1: 0.65 - 0.70})
    assert fwt.result() == pytest.approx({1: 0.35 - 0.20, 2: 0.40 - 0.30})
