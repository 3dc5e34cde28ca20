"""Tests of clsuite.flatness against closed forms on a quadratic loss L(θ) = ½ θᵀAθ + bᵀθ (Hessian A)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from clsuite import flatness as fl
from clsuite.reports.plots import plot_surface, plot_surfaces_side_by_side

EIGS = (5.0, 2.0, 0.5)


def _spd(eigs=EIGS, seed: int = 1234) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=g, dtype=torch.float64))
    return q @ torch.diag(torch.tensor(eigs, dtype=torch.float64)) @ q.T


class Quadratic(nn.Module):
    """L(θ) = ½ θᵀAθ + bᵀθ with θ one tensor of size 3, or split into tensors of size 2 and 1."""

    def __init__(self, A: torch.Tensor, b: torch.Tensor, theta: torch.Tensor, split: bool = False):
        super().__init__()
        self.register_buffer("A", A.clone())
        self.register_buffer("b", b.clone())
        self.split = split
        if split:
            self.t1 = nn.Parameter(theta[:2].clone())
            self.t2 = nn.Parameter(theta[2:].clone())
        else:
            self.theta = nn.Parameter(theta.clone())
        self.drop = nn.Dropout(0.5)  # only to check that train/eval flags are restored

    def vec(self) -> torch.Tensor:
        return torch.cat([self.t1, self.t2]) if self.split else self.theta

    def forward(self) -> torch.Tensor:
        t = self.vec()
        return 0.5 * t @ self.A @ t + self.b @ t

    def grad(self) -> torch.Tensor:
        return self.A @ self.vec().detach() + self.b


def make(split: bool = False, A: torch.Tensor | None = None, at_min: bool = False) -> Quadratic:
    A = _spd() if A is None else A
    b = torch.tensor([0.3, -0.7, 0.2], dtype=torch.float64)
    theta = -torch.linalg.solve(A, b) if at_min else torch.tensor([0.9, -0.4, 1.3], dtype=torch.float64)
    return Quadratic(A, b, theta, split)


def weights(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


Q = dict(disable_progress=True)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny problems gain nothing from intra-op threads, and spin-waiting threads are slow on a shared 2-core box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------- Hessian
@pytest.mark.parametrize("split", [False, True])
def test_top_eigenvalue(split):
    m = make(split)
    assert fl.hessian_top_eigenvalue(m, m, **Q) == pytest.approx(5.0, rel=1e-3)
    assert fl.hessian_top_eigenvalue(m, m, iters=200, tol=1e-12, **Q) == pytest.approx(5.0, rel=1e-9)


@pytest.mark.parametrize("eigs, top", [((-5.0, 2.0, 0.5), 2.0), ((-5.0, -2.0, -0.5), -0.5)])
def test_top_eigenvalue_when_dominant_eigenvalue_is_negative(eigs, top):
    """Power iteration finds λ_dom = −5; the shifted second run must return the algebraically largest λ."""
    m = make(A=_spd(eigs))
    assert fl.hessian_top_eigenvalue(m, m, iters=300, tol=1e-12, **Q) == pytest.approx(top, rel=1e-6)


@pytest.mark.parametrize("split", [False, True])
def test_trace_exact_for_diagonal_hessian(split):
    m = make(split, A=torch.diag(torch.tensor(EIGS, dtype=torch.float64)))
    # zᵀAz = Σ A_ii z_i² = tr A for every Rademacher z.
    assert fl.hessian_trace(m, m, samples=3, **Q) == pytest.approx(sum(EIGS), abs=1e-12)


def test_trace_rotated_within_sampling_error():
    A = _spd()
    m = make(A=A)
    n = 2000
    var = 2 * float((A**2).sum() - (torch.diagonal(A) ** 2).sum())  # Var(zᵀAz) for Rademacher z
    est = fl.hessian_trace(m, m, samples=n, **Q)
    assert abs(est - sum(EIGS)) <= 4 * math.sqrt(var / n)


def test_hutchinson_samples_spread_matches_theory():
    """The per-sample terms average to hessian_trace and their variance is 2 Σ_{i≠j} A_ij² (their standard error
    is what a reader needs to judge a 5-sample trace)."""
    A = _spd()
    m = make(A=A)
    terms = fl.hutchinson_samples(m, m, samples=2000, **Q)
    assert sum(terms) / len(terms) == pytest.approx(fl.hessian_trace(m, m, samples=2000, **Q), rel=1e-12)
    var = 2 * float((A**2).sum() - (torch.diagonal(A) ** 2).sum())
    assert float(torch.tensor(terms).var()) == pytest.approx(var, rel=0.2)


def test_partial_dependence_and_frozen_params():
    """A parameter the loss ignores gets zero curvature; a frozen one is not perturbed by default."""
    m = make()
    m.unused = nn.Parameter(torch.ones(2, dtype=torch.float64))
    m.frozen = nn.Parameter(torch.full((3,), 2.0, dtype=torch.float64), requires_grad=False)
    frozen0 = m.frozen.detach().clone()

    def loss():
        assert torch.equal(m.frozen, frozen0)
        return m() + 0.0 * m.frozen.sum()

    assert fl.hessian_top_eigenvalue(m, loss, iters=100, tol=1e-10, **Q) == pytest.approx(5.0, rel=1e-6)
    fl.loss_surface_2d(m, loss, steps=3, filter_normalize=False, **Q)
    fl.worst_case_sharpness(m, loss, steps=3, **Q)
    # Passing the frozen tensor explicitly measures it (requires_grad switched on temporarily, then restored).
    assert fl.hessian_trace(m, m, params=[m.frozen], samples=2, **Q) == 0.0
    assert m.frozen.requires_grad is False


# ------------------------------------------------------------------------------------------- SAM-style
@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("rho", [0.05, 0.3])
def test_worst_case_first_order_closed_form(split, rho):
    m = make(split)
    A, g = m.A, m.grad()
    e = rho * g / g.norm()  # global L2 norm over all tensors
    expected = float(g @ e + 0.5 * e @ A @ e)
    assert fl.worst_case_sharpness(m, m, rho=rho, steps=1, **Q) == pytest.approx(expected, rel=1e-10)


def _exact_ball_max(A: torch.Tensor, g: torch.Tensor, rho: float) -> float:
    """max_{‖e‖≤ρ} gᵀe + ½eᵀAe for SPD A: attained on the sphere at e = (μI − A)⁻¹g with μ > λ_max solving
    ‖e‖ = ρ (trust-region optimality for a maximisation); μ by bisection in A's eigenbasis."""
    lam, V = torch.linalg.eigh(A)
    c = V.T @ g
    norm = lambda mu: float(((c / (mu - lam)) ** 2).sum().sqrt())  # noqa: E731  decreasing for mu > λ_max
    lo, hi = float(lam.max()) + 1e-15, float(lam.max()) + float(g.norm()) / rho + 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if norm(mid) > rho else (lo, mid)
    e = V @ (c / (hi - lam))
    return float(g @ e + 0.5 * e @ A @ e)


@pytest.mark.parametrize("split", [False, True])
def test_worst_case_multi_step_bounds(split):
    m = make(split)
    rho = 0.5
    A, g = m.A, m.grad()
    one = fl.worst_case_sharpness(m, m, rho=rho, steps=1, **Q)
    vals = [fl.worst_case_sharpness(m, m, rho=rho, steps=k, **Q) for k in (2, 5, 30)]
    upper = rho * float(g.norm()) + 0.5 * rho**2 * max(EIGS)
    exact = _exact_ball_max(A, g, rho)
    assert one <= vals[0] <= vals[1] <= vals[2] <= upper
    assert vals[2] <= exact + 1e-12
    assert vals[2] == pytest.approx(exact, rel=1e-6)
    assert vals[2] > one  # the projected ascent does improve on SAM's first-order point here


def test_worst_case_at_stationary_point_uses_seeded_random_direction():
    m = make(at_min=True)
    rho = 0.1
    v = fl.worst_case_sharpness(m, m, rho=rho, steps=1, seed=3, **Q)
    assert 0.5 * rho**2 * min(EIGS) - 1e-12 <= v <= 0.5 * rho**2 * max(EIGS) + 1e-12
    assert v == fl.worst_case_sharpness(m, m, rho=rho, steps=1, seed=3, **Q)
    many = fl.worst_case_sharpness(m, m, rho=rho, steps=40, seed=3, **Q)
    assert many == pytest.approx(0.5 * rho**2 * max(EIGS), rel=1e-3)


# ------------------------------------------------------------------------------------------- directions
def test_filter_normalized_directions():
    torch.manual_seed(0)
    lin = nn.Linear(4, 3)
    ps = list(lin.parameters())
    (raw,) = fl.random_directions(ps, 1, seed=7, filter_normalize=False)
    (fn,) = fl.random_directions(ps, 1, seed=7, filter_normalize=True)
    assert torch.allclose(fn[0].norm(dim=1), lin.weight.detach().norm(dim=1), rtol=1e-5)
    # same Gaussian stream: each row is a positive multiple of the raw draw
    ratio = fn[0] / raw[0]
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-4) and bool((ratio > 0).all())
    assert torch.count_nonzero(fn[1]) == 0 and torch.count_nonzero(raw[1]) == 3  # 1-D bias zeroed
    two = fl.random_directions(ps, 2, seed=7)
    assert torch.equal(two[0][0], fn[0]) and not torch.equal(two[1][0], fn[0])


# ------------------------------------------------------------------------------------------- surfaces
def test_surface_isotropic_minimum_unit_directions():
    c = 3.0
    m = make(A=c * torch.eye(3, dtype=torch.float64), at_min=True)
    e1 = [torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)]
    e2 = [torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)]
    s = fl.loss_surface_2d(m, m, span=0.5, steps=5, directions=[e1, e2], **Q)
    a, b = np.meshgrid(s["alphas"], s["betas"], indexing="ij")
    np.testing.assert_allclose(s["loss"] - s["base_loss"], 0.5 * c * (a**2 + b**2), atol=1e-12)
    sh = fl.surface_sharpness(s)
    assert sh["curvature"] == pytest.approx(2 * c, rel=1e-9)
    assert s["loss"][2, 2] == s["base_loss"]  # centre of an odd grid is θ itself


def test_surface_random_directions_curvature_matches_hessian():
    m = make()  # general A, not at the minimum: the Laplacian of a quadratic is still d₁ᵀAd₁ + d₂ᵀAd₂
    s = fl.loss_surface_2d(m, m, span=1.0, steps=7, seed=5, filter_normalize=False, **Q)
    d1, d2 = fl.random_directions([m.theta], 2, seed=5, filter_normalize=False)
    expected = float(d1[0] @ m.A @ d1[0] + d2[0] @ m.A @ d2[0])
    assert fl.surface_sharpness(s)["curvature"] == pytest.approx(expected, rel=1e-9)
    assert s["direction_norms"] == pytest.approx([float(d1[0].norm()), float(d2[0].norm())])


def test_surface_1d():
    c = 2.0
    m = make(A=c * torch.eye(3, dtype=torch.float64), at_min=True)
    s = fl.loss_surface_1d(m, m, span=1.0, steps=11, filter_normalize=False, seed=2, **Q)
    d = s["direction_norms"][0]
    np.testing.assert_allclose(s["loss"] - s["base_loss"], 0.5 * c * d**2 * s["alphas"] ** 2, atol=1e-12)
    assert fl.surface_sharpness(s)["curvature"] == pytest.approx(c * d**2, rel=1e-9)


def test_surface_sharpness_formulas():
    a = np.linspace(-1, 1, 5)
    b = np.linspace(-2, 2, 9)
    A, B = np.meshgrid(a, b, indexing="ij")
    s = {"alphas": a, "betas": b, "loss": A**2 + 3 * B**2 + A}
    out = fl.surface_sharpness(s)
    assert out["curvature"] == pytest.approx(2 + 6)
    ga, gb = np.gradient(s["loss"], a, b)
    assert out["avg_gradient"] == pytest.approx(np.hypot(ga, gb).mean())
    assert out["mean_abs_gradient"] == pytest.approx(((abs(ga) + abs(gb)) / 2).mean())
    flat = fl.surface_sharpness({"alphas": a, "betas": b, "loss": np.full((5, 9), 1.5)})
    assert flat == {"curvature": 0.0, "avg_gradient": 0.0, "mean_abs_gradient": 0.0}
    with pytest.raises(ValueError):
        fl.surface_sharpness({"alphas": a[:2], "betas": b, "loss": np.zeros((2, 9))})


# ------------------------------------------------------------------------------------------- hygiene
ALL = {
    "surface_1d": lambda m, **k: fl.loss_surface_1d(m, m, steps=5, **k, **Q),
    "surface_2d": lambda m, **k: fl.loss_surface_2d(m, m, steps=3, **k, **Q),
    "surface_2d_raw": lambda m, **k: fl.loss_surface_2d(m, m, steps=3, filter_normalize=False, **k, **Q),
    "eig": lambda m, **k: fl.hessian_top_eigenvalue(m, m, iters=5, **k, **Q),
    "trace": lambda m, **k: fl.hessian_trace(m, m, samples=4, **k, **Q),
    "sam1": lambda m, **k: fl.worst_case_sharpness(m, m, steps=1, **k, **Q),
    "sam3": lambda m, **k: fl.worst_case_sharpness(m, m, steps=3, **k, **Q),
}


@pytest.mark.parametrize("name", list(ALL))
def test_restores_weights_modes_grads_and_global_rng(name):
    m = make(split=True)
    m.train()
    m.drop.eval()  # a mixed state must come back as it was
    before = weights(m)
    rng = torch.get_rng_state()
    ALL[name](m)
    assert all(torch.equal(x, y) for x, y in zip(before, weights(m)))
    assert m.training and not m.drop.training
    assert all(p.grad is None and p.requires_grad for p in m.parameters())
    assert torch.equal(rng, torch.get_rng_state())


@pytest.mark.parametrize("name", list(ALL))
def test_seeded_reproducibility(name):
    m = make()

    def run(seed):
        r = ALL[name](m, seed=seed)
        return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in r.items()} if isinstance(r, dict) else r

    assert run(0) == run(0)
    if name.startswith(("surface", "trace", "eig")):
        assert run(0) != run(1)


def test_restores_weights_on_error():
    m = make()
    before = weights(m)
    calls = {"n": 0}

    def loss():
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("boom")
        return m()

    with pytest.raises(RuntimeError, match="boom"):
        fl.loss_surface_2d(m, loss, steps=3, filter_normalize=False, **Q)
    assert all(torch.equal(x, y) for x, y in zip(before, weights(m)))
    assert m.training


def test_loss_without_grad_is_rejected():
    m = make()

    def loss():
        with torch.no_grad():
            return m()

    with pytest.raises(ValueError, match="without grad"):
        fl.hessian_top_eigenvalue(m, loss, **Q)


def _is_png(p) -> bool:
    return p.exists() and p.stat().st_size > 1000 and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots(tmp_path):
    m = make(A=_spd(), at_min=True)
    s = fl.loss_surface_2d(m, m, steps=5, filter_normalize=False, **Q)
    paths = plot_surface(s, tmp_path / "sub" / "quad", "quadratic")
    assert [p.name for p in paths] == ["quad_contour.png", "quad_3d.png"] and all(map(_is_png, paths))
    s2 = fl.loss_surface_2d(m, m, steps=5, span=0.5, filter_normalize=False, **Q)
    out = plot_surfaces_side_by_side({"naive": s, "SAM": s2}, tmp_path / "cmp.png", "naive vs SAM")
    assert _is_png(out)
    (p1,) = plot_surface(fl.loss_surface_1d(m, m, steps=5, filter_normalize=False, **Q), tmp_path / "line", "1-D")
    assert _is_png(p1)


# ------------------------------------------------------------------------------------------- real model
@pytest.mark.slow
def test_tiny_llama_smoke():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=2, intermediate_size=32, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)  # default sdpa attention: HVPs must switch to the math kernel
    model.train()
    ids = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(0))

    def loss_fn():
        return model(input_ids=ids, labels=ids).loss

    before = weights(model)
    eig = fl.hessian_top_eigenvalue(model, loss_fn, iters=10, **Q)
    assert math.isfinite(eig) and eig > 0
    s = fl.loss_surface_2d(model, loss_fn, steps=3, span=0.5, **Q)
    assert s["loss"].shape == (3, 3) and np.isfinite(s["loss"]).all()
    assert s["loss"][1, 1] == pytest.approx(s["base_loss"], abs=1e-6)
    assert math.isfinite(fl.surface_sharpness(s)["curvature"])
    assert math.isfinite(fl.worst_case_sharpness(model, loss_fn, steps=2, **Q))
    assert all(torch.equal(x, y) for x, y in zip(before, weights(model)))
    assert model.training
