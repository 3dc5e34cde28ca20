"""Model-agnostic flatness and sharpness measures of a loss landscape on a fixed batch; lower is flatter.
Conventions, formulas and costs: docs/flatness.md."""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from .numerics import at_least_float32

__all__ = [
    "random_directions",
    "loss_surface_1d",
    "loss_surface_2d",
    "surface_sharpness",
    "hessian_top_eigenvalue",
    "hessian_trace",
    "hutchinson_samples",
    "worst_case_sharpness",
]

LossFn = Callable[[], Tensor]
Vec = list[Tensor]

_EPS = 1e-12


# ----------------------------------------------------------------------------------------------- helpers
def _resolve_params(model: torch.nn.Module, params: Sequence[Tensor] | None) -> list[Tensor]:
    """The given parameters (or the model's trainable ones), deduplicated by identity, order kept."""
    src = [p for p in model.parameters() if p.requires_grad] if params is None else list(params)
    seen: set[int] = set()
    out: list[Tensor] = []
    for p in src:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    if not out:
        raise ValueError("no parameters to measure: pass `params` or leave some with requires_grad=True")
    return out


@contextlib.contextmanager
def _measuring(model: torch.nn.Module, params: list[Tensor]) -> Iterator[list[Tensor]]:
    """Eval mode, params requiring grad; yields a snapshot and restores weights/flags bit-exactly on exit."""
    modes = [(m, m.training) for m in model.modules()]
    flags = [p.requires_grad for p in params]
    with torch.no_grad():
        snapshot = [p.detach().clone() for p in params]
    model.eval()
    try:
        for p in params:
            p.requires_grad_(True)
        yield snapshot
    finally:
        with torch.no_grad():
            for p, s in zip(params, snapshot):
                p.copy_(s)
        for p, f in zip(params, flags):
            p.requires_grad_(f)
        for m, t in modes:
            m.training = t


def _generator(seed: int) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(int(seed))
    return g


def _gaussian_like(params: list[Tensor], gen: torch.Generator) -> Vec:
    return [torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.device, p.dtype) for p in params]


def _rademacher_like(params: list[Tensor], gen: torch.Generator) -> Vec:
    return [
        (torch.randint(0, 2, p.shape, generator=gen, dtype=torch.int8).to(torch.float32) * 2 - 1).to(p.device, p.dtype)
        for p in params
    ]


def _acc(x: Tensor) -> Tensor:
    """``x`` in the dtype reductions are taken in."""
    return x.to(at_least_float32(x.dtype))


def _dot(a: Vec, b: Vec) -> float:
    return float(sum(float((_acc(x) * _acc(y)).sum()) for x, y in zip(a, b)))


def _norm(a: Vec) -> float:
    return math.sqrt(max(_dot(a, a), 0.0))


def _scale(a: Vec, c: float) -> Vec:
    return [x * c for x in a]


def _set_weights(params: list[Tensor], base: Vec, *offsets: tuple[float, Vec]) -> None:
    """θ ← base + Σ coef·d  (in place, no autograd)."""
    with torch.no_grad():
        for i, p in enumerate(params):
            p.copy_(base[i])
            for coef, d in offsets:
                if coef != 0.0:
                    p.add_(d[i], alpha=coef)


def _scalar(loss: Any) -> Tensor:
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise TypeError(f"loss_fn must return a scalar tensor, got {type(loss).__name__}")
    return loss.reshape(())


def _grad(loss_fn: LossFn, params: list[Tensor], create_graph: bool = False) -> tuple[Tensor, Vec]:
    """L and ∇L (zeros for parameters the loss does not depend on)."""
    with torch.enable_grad():
        loss = _scalar(loss_fn())
        if not loss.requires_grad:
            raise ValueError("loss_fn returned a tensor without grad: it must not run under torch.no_grad() "
                             "and must depend on `params`")
        grads = torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True)
    return loss, [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]


@contextlib.contextmanager
def _double_backward_ok() -> Iterator[None]:
    """Math SDPA attention (the fused kernels have no double backward)."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - very old torch
        yield
        return
    with sdpa_kernel([SDPBackend.MATH]):
        yield


def _hvp_operator(loss_fn: LossFn, params: list[Tensor]) -> tuple[float, Callable[[Vec], Vec]]:
    """(L, v ↦ Hv); the first-order graph is built once and reused for every product."""
    with _double_backward_ok():
        loss, grads = _grad(loss_fn, params, create_graph=True)
    live = [i for i, g in enumerate(grads) if g.requires_grad]

    def hvp(v: Vec) -> Vec:
        if not live:
            return [torch.zeros_like(p) for p in params]
        with torch.enable_grad():
            hv = torch.autograd.grad([grads[i] for i in live], params, grad_outputs=[v[i] for i in live],
                                     retain_graph=True, allow_unused=True)
        return [torch.zeros_like(p) if h is None else h.detach() for h, p in zip(hv, params)]

    return float(loss.detach()), hvp


def _progress(total: int, desc: str, disable: bool) -> tqdm:
    return tqdm(total=total, desc=desc, disable=disable, leave=False)


# ------------------------------------------------------------------------------------------- directions
def random_directions(params: Sequence[Tensor], n: int, seed: int, filter_normalize: bool = True) -> list[list[Tensor]]:
    """``n`` seeded Gaussian directions shaped like ``params``; filter-normalized per Li et al. 2018 (rows scaled
    to the weights' row norms, ≤1-D tensors zeroed) unless ``filter_normalize=False``."""
    params = list(params)
    gen = _generator(seed)
    out: list[list[Tensor]] = []
    for _ in range(n):
        dirs = _gaussian_like(params, gen)  # drawn for every tensor, so the stream is the same either way
        if filter_normalize:
            with torch.no_grad():
                for i, (d, p) in enumerate(zip(dirs, params)):
                    if p.dim() <= 1:
                        dirs[i] = torch.zeros_like(d)
                        continue
                    w = _acc(p.detach().reshape(p.shape[0], -1))
                    dv = _acc(d.reshape(p.shape[0], -1))
                    factor = w.norm(dim=1, keepdim=True) / (dv.norm(dim=1, keepdim=True) + 1e-10)
                    dirs[i] = (dv * factor).reshape(p.shape).to(p.dtype)
        out.append(dirs)
    return out


# ---------------------------------------------------------------------------------------------- surfaces
def _check_directions(directions: Sequence[Sequence[Tensor]], params: list[Tensor], n: int) -> list[Vec]:
    dirs = [list(d) for d in directions]
    if len(dirs) != n or any(len(d) != len(params) for d in dirs):
        raise ValueError(f"expected {n} direction(s), each with one tensor per parameter ({len(params)})")
    for d in dirs:
        for x, p in zip(d, params):
            if x.shape != p.shape:
                raise ValueError(f"direction tensor shape {tuple(x.shape)} != parameter shape {tuple(p.shape)}")
    return [[x.detach().to(p.device, p.dtype) for x, p in zip(d, params)] for d in dirs]


def loss_surface_1d(model: torch.nn.Module, loss_fn: LossFn, params: Sequence[Tensor] | None = None,
                    span: float = 1.0, steps: int = 21, seed: int = 0, filter_normalize: bool = True,
                    directions: Sequence[Sequence[Tensor]] | None = None,
                    disable_progress: bool = False) -> dict[str, Any]:
    """f(α) = L(θ + α d) for α ∈ linspace(−span, span, steps) along one seeded random (or given) direction.
    Returns ``alphas``, ``loss`` (numpy), ``base_loss``, ``direction_norms`` and the settings."""
    if steps < 2:
        raise ValueError("steps must be >= 2")
    params = _resolve_params(model, params)
    (d1,) = (_check_directions(directions, params, 1) if directions is not None
             else random_directions(params, 1, seed, filter_normalize))
    alphas = np.linspace(-span, span, steps)
    loss = np.empty(steps)
    with _measuring(model, params) as base, torch.no_grad():
        base_loss = float(_scalar(loss_fn()))
        for i, a in enumerate(tqdm(alphas, desc="loss surface 1-D", disable=disable_progress, leave=False)):
            _set_weights(params, base, (float(a), d1))
            loss[i] = float(_scalar(loss_fn()))
    return {"alphas": alphas, "loss": loss, "base_loss": base_loss, "direction_norms": [_norm(d1)],
            "span": float(span), "seed": int(seed), "filter_normalize": bool(filter_normalize)}


def loss_surface_2d(model: torch.nn.Module, loss_fn: LossFn, params: Sequence[Tensor] | None = None,
                    span: float = 1.0, steps: int = 11, seed: int = 0, filter_normalize: bool = True,
                    directions: Sequence[Sequence[Tensor]] | None = None,
                    disable_progress: bool = False) -> dict[str, Any]:
    """f(α, β) = L(θ + α d₁ + β d₂) on a steps × steps grid over [−span, span]²; ``loss[i, j] = f(alphas[i],
    betas[j])``. Returns ``alphas``, ``betas``, ``loss`` (numpy), ``base_loss``, ``direction_norms``, settings."""
    if steps < 2:
        raise ValueError("steps must be >= 2")
    params = _resolve_params(model, params)
    d1, d2 = (_check_directions(directions, params, 2) if directions is not None
              else random_directions(params, 2, seed, filter_normalize))
    alphas = np.linspace(-span, span, steps)
    betas = np.linspace(-span, span, steps)
    loss = np.empty((steps, steps))
    with _measuring(model, params) as base, torch.no_grad():
        base_loss = float(_scalar(loss_fn()))
        with _progress(steps * steps, "loss surface 2-D", disable_progress) as bar:
            for i, a in enumerate(alphas):
                for j, b in enumerate(betas):
                    _set_weights(params, base, (float(a), d1), (float(b), d2))
                    loss[i, j] = float(_scalar(loss_fn()))
                    bar.update()
    return {"alphas": alphas, "betas": betas, "loss": loss, "base_loss": base_loss,
            "direction_norms": [_norm(d1), _norm(d2)], "span": float(span), "seed": int(seed),
            "filter_normalize": bool(filter_normalize)}


def surface_sharpness(surface: dict[str, Any]) -> dict[str, float]:
    """``curvature`` (mean interior discrete Laplacian), ``avg_gradient`` (mean ‖∇f‖) and ``mean_abs_gradient``
    (mean of (|∂_α f| + |∂_β f|)/2) of a surface from ``loss_surface_2d`` (or ``_1d``); lower = flatter."""
    f = np.asarray(surface["loss"], dtype=np.float64)
    alphas = np.asarray(surface["alphas"], dtype=np.float64)
    if f.ndim == 1:
        if f.shape[0] < 3:
            raise ValueError("need at least 3 points for curvature")
        h = (alphas[-1] - alphas[0]) / (len(alphas) - 1)
        lap = (f[2:] - 2 * f[1:-1] + f[:-2]) / h**2
        grad = np.abs(np.gradient(f, alphas))
        return {"curvature": float(lap.mean()), "avg_gradient": float(grad.mean()),
                "mean_abs_gradient": float(grad.mean())}
    betas = np.asarray(surface["betas"], dtype=np.float64)
    if f.shape != (len(alphas), len(betas)) or min(f.shape) < 3:
        raise ValueError(f"loss grid must be (len(alphas), len(betas)) with both >= 3, got {f.shape}")
    ha = (alphas[-1] - alphas[0]) / (len(alphas) - 1)
    hb = (betas[-1] - betas[0]) / (len(betas) - 1)
    c = f[1:-1, 1:-1]
    lap = (f[2:, 1:-1] - 2 * c + f[:-2, 1:-1]) / ha**2 + (f[1:-1, 2:] - 2 * c + f[1:-1, :-2]) / hb**2
    ga, gb = np.gradient(f, alphas, betas)
    return {"curvature": float(lap.mean()),
            "avg_gradient": float(np.sqrt(ga**2 + gb**2).mean()),
            "mean_abs_gradient": float(((np.abs(ga) + np.abs(gb)) / 2).mean())}


# ---------------------------------------------------------------------------------------------- Hessian
def _power_iteration(hvp: Callable[[Vec], Vec], v: Vec, iters: int, tol: float, shift: float, bar: tqdm) -> float:
    """Dominant eigenvalue of H − shift·I (Rayleigh quotient), from the start vector ``v``."""
    v = _scale(v, 1.0 / max(_norm(v), _EPS))
    eig: float = 0.0
    prev: float | None = None
    for _ in range(iters):
        w = hvp(v)
        if shift != 0.0:
            w = [x - shift * y for x, y in zip(w, v)]
        eig = _dot(v, w)
        wn = _norm(w)
        bar.update()
        bar.set_postfix(eig=f"{eig + shift:.4g}")
        if wn < _EPS:
            break
        v = _scale(w, 1.0 / wn)
        if prev is not None and abs(eig - prev) <= tol * (abs(prev) + _EPS):
            break
        prev = eig
    return eig


def hessian_top_eigenvalue(model: torch.nn.Module, loss_fn: LossFn, params: Sequence[Tensor] | None = None,
                           iters: int = 20, tol: float = 1e-4, seed: int = 0,
                           disable_progress: bool = False) -> float:
    """Largest Hessian eigenvalue λ_max by power iteration on Hessian-vector products (double backward), with a
    shifted second run when the dominant one is negative. Cost: 1 pass with graph + ≤ 2·``iters`` HVPs."""
    params = _resolve_params(model, params)
    gen = _generator(seed)
    with _measuring(model, params):
        _, hvp = _hvp_operator(loss_fn, params)
        with _progress(iters, "Hessian top eigenvalue", disable_progress) as bar:
            eig = _power_iteration(hvp, _gaussian_like(params, gen), iters, tol, 0.0, bar)
            if eig < 0:  # dominant eigenvalue negative: λ_max = λ_dom + dominant eigenvalue of H − λ_dom·I (≥ 0)
                bar.reset(total=iters)
                eig = eig + _power_iteration(hvp, _gaussian_like(params, gen), iters, tol, eig, bar)
    return float(eig)


def hutchinson_samples(model: torch.nn.Module, loss_fn: LossFn, params: Sequence[Tensor] | None = None,
                       samples: int = 10, seed: int = 0, disable_progress: bool = False) -> list[float]:
    """The terms zᵀHz (Rademacher z) whose mean is the Hutchinson trace; their spread gives its standard error.
    Cost: 1 pass with graph + ``samples`` HVPs (each ≈ 2 backwards)."""
    if samples < 1:
        raise ValueError("samples must be >= 1")
    params = _resolve_params(model, params)
    gen = _generator(seed)
    out = []
    with _measuring(model, params):
        _, hvp = _hvp_operator(loss_fn, params)
        for _ in tqdm(range(samples), desc="Hessian trace", disable=disable_progress, leave=False):
            z = _rademacher_like(params, gen)
            out.append(_dot(z, hvp(z)))
    return out


def hessian_trace(model: torch.nn.Module, loss_fn: LossFn, params: Sequence[Tensor] | None = None,
                  samples: int = 10, seed: int = 0, disable_progress: bool = False) -> float:
    """Hutchinson estimate (1/S) Σ zᵀHz with Rademacher z of the Hessian trace (see ``hutchinson_samples``)."""
    terms = hutchinson_samples(model, loss_fn, params, samples, seed, disable_progress)
    return sum(terms) / len(terms)


# ---------------------------------------------------------------------------------------------- SAM-style
def worst_case_sharpness(model: torch.nn.Module, loss_fn: LossFn, params: Sequence[Tensor] | None = None,
                         rho: float = 0.05, steps: int = 1, seed: int = 0, step_size: float | None = None,
                         disable_progress: bool = False) -> float:
    """max_{‖e‖≤ρ} L(θ+e) − L(θ) (global L2 ball) by normalized projected gradient ascent (``steps`` = 1: SAM's
    e = ρ g/‖g‖); a lower bound, non-decreasing in ``steps``. Cost: ``steps`` passes + 1 forward."""
    if steps < 1:
        raise ValueError("steps must be >= 1")
    if rho < 0:
        raise ValueError("rho must be >= 0")
    params = _resolve_params(model, params)
    eta = float(rho if step_size is None else step_size)
    gen = _generator(seed)
    best = -math.inf
    with _measuring(model, params) as base:
        e = [torch.zeros_like(p) for p in params]
        base_loss = math.nan
        for k in tqdm(range(steps), desc="worst-case sharpness", disable=disable_progress, leave=False):
            _set_weights(params, base, (1.0, e))
            loss, g = _grad(loss_fn, params)
            if k == 0:
                base_loss = float(loss.detach())
            else:
                best = max(best, float(loss.detach()))
            gn = _norm(g)
            if gn < _EPS:
                g = _gaussian_like(params, gen)
                gn = max(_norm(g), _EPS)
            e = [x + (eta / gn) * y.detach() for x, y in zip(e, g)]
            en = _norm(e)
            if en > rho:
                e = _scale(e, rho / en)
        _set_weights(params, base, (1.0, e))
        with torch.no_grad():
            best = max(best, float(_scalar(loss_fn())))
    return best - base_loss
