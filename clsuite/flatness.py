"""Model-agnostic flatness / sharpness measures of a loss landscape.

Every function takes a ``torch.nn.Module`` ``model``, a list of parameters ``params`` (default: the model's
parameters with ``requires_grad``, deduplicated, so with a LoRA model only the adapter is perturbed) and
``loss_fn: () -> scalar Tensor`` that evaluates the model on a fixed batch (the caller closes over the data).
Lower values always mean flatter.  Hessian eigenvalue/trace and the ρ-ball sharpness are measured in the raw
parameter metric (not invariant to rescaling weights, and ρ means something different for a LoRA adapter than
for full weights); the filter-normalized surfaces are scale-invariant per row.

Conventions shared by all functions
-----------------------------------
* The selected parameters are treated as ONE vector θ: ⟨u, v⟩ = Σ_p Σ_i u_p[i] v_p[i] over all tensors,
  ‖u‖ = √⟨u, u⟩ (global L2 norm, never per tensor).  L(θ) = ``loss_fn()``.
* The weights are copied before and copied back (``p.copy_``, under ``torch.no_grad``) afterwards, so they are
  bit-exactly restored, also on error.  ``.grad`` fields are never touched (``torch.autograd.grad`` is used).
* The model is put in ``eval()`` mode for the measurement (dropout off, so ``loss_fn`` is deterministic) and
  every submodule's ``training`` flag is restored afterwards.  Explicitly passed frozen parameters get
  ``requires_grad`` temporarily switched on.
* Randomness comes from a local ``torch.Generator`` (CPU, seeded with ``seed``), draws in float32 then cast to
  each parameter's device/dtype: results do not depend on, and do not advance, the global RNG.
* Hessian-vector products run the forward pass with ``SDPBackend.MATH`` scaled-dot-product attention, because
  the fused (flash / memory-efficient) SDPA kernels have no double backward.  Other kernels without double
  backward (e.g. ``attn_implementation="flash_attention_2"``, fused cross-entropy) must be avoided by the caller.
* A full Hessian is never formed; memory is O(#params) vectors plus one retained double-backward graph.

Formulas
--------
Random directions (``random_directions``): d_p ~ N(0, I) i.i.d. for every tensor p.  With filter normalization
(Li et al. 2018, "Visualizing the loss landscape of neural nets"), a tensor with ≥ 2 dims is viewed as rows
r = 0..shape[0]-1 (a row = one filter / output unit, ``p[r].flatten()``; for an embedding: one token) and
    d_{p,r} ← d_{p,r} · ‖θ_{p,r}‖ / (‖d_{p,r}‖ + 1e-10),
while tensors with ≤ 1 dim (biases, norm gains, scalars) get d_p = 0 (Li et al.'s convention: they are not
perturbed).  Rows of zero weights (e.g. LoRA ``B`` at initialisation) therefore get a zero direction.

Surfaces: f(α) = L(θ + α d₁) for α ∈ linspace(−span, span, steps) (``loss_surface_1d``) and
f(α, β) = L(θ + α d₁ + β d₂) on the product grid (``loss_surface_2d``); ``loss[i, j] = f(alphas[i], betas[j])``.

``surface_sharpness`` on a 2-D grid with spacings h_α = α₁ − α₀, h_β = β₁ − β₀ (n × m points, n, m ≥ 3):
    curvature         = mean_{0<i<n−1, 0<j<m−1} [ (f_{i+1,j} − 2 f_{i,j} + f_{i−1,j}) / h_α²
                                                 + (f_{i,j+1} − 2 f_{i,j} + f_{i,j−1}) / h_β² ]
                        (mean signed discrete Laplacian over the interior; exactly d₁ᵀH d₁ + d₂ᵀH d₂ for a
                        quadratic loss with Hessian H),
    (∂_α f, ∂_β f)    = numpy.gradient(f, alphas, betas)  (central differences inside, one-sided at edges),
    avg_gradient      = mean_{all i,j} √(∂_α f² + ∂_β f²),
    mean_abs_gradient = mean_{all i,j} (|∂_α f| + |∂_β f|) / 2.
On a 1-D surface: curvature = mean_{0<i<n−1} (f_{i+1} − 2 f_i + f_{i−1}) / h², and
avg_gradient = mean_abs_gradient = mean_i |∂_α f|.

Hessian-vector product (Pearlmutter): H v = ∇_θ ⟨∇_θ L(θ), v⟩ (``autograd.grad`` with ``create_graph=True``,
then a second ``autograd.grad`` with ``grad_outputs=v``; the first-order graph is built once and retained).

``hessian_top_eigenvalue`` (power iteration, as in PyHessian): v₀ ~ N(0, I)/‖·‖;  w_k = H v_k;
λ_k = ⟨v_k, w_k⟩;  v_{k+1} = w_k / ‖w_k‖;  stop when |λ_k − λ_{k−1}| ≤ tol·(|λ_{k−1}| + 1e−12) or after
``iters`` products.  This converges to the eigenvalue λ_dom of largest magnitude at rate (|λ₂|/|λ₁|)^{2k}.  If
λ_dom ≥ 0 it is λ_max and is returned.  If λ_dom < 0 (indefinite Hessian, e.g. at random initialisation), the
same iteration is run on H − λ_dom·I (positive semi-definite up to convergence error; fresh seeded start) and
λ_max = λ_dom + (its dominant eigenvalue) is returned.  Slow convergence (|λ₂| ≈ |λ₁|) shows as a result that
changes with ``iters``; report ``iters``/``tol`` with the number.

``hessian_trace`` (Hutchinson): tr(H) ≈ (1/S) Σ_{s=1..S} z_sᵀ H z_s with z_s ∈ {−1, +1}^N i.i.d. Rademacher.
Unbiased, Var(zᵀHz) = 2 Σ_{i≠j} H_ij², hence exact (zero variance) for a diagonal H.

``worst_case_sharpness`` (SAM-style, Foret et al. 2021): S_ρ = max_{‖e‖≤ρ} L(θ + e) − L(θ), estimated from
below by normalized projected gradient ascent with K = ``steps`` gradient evaluations:
    e₀ = 0;  g_k = ∇L(θ + e_k);  e_{k+1} = Π_ρ(e_k + η g_k/‖g_k‖),  Π_ρ(x) = x · min(1, ρ/‖x‖),
    η = ``step_size`` (default ρ);   returned value = max_{1≤k≤K} L(θ + e_k) − L(θ).
K = 1 gives SAM's first-order solution e = ρ g/‖g‖ (so L(θ+e) − L(θ) = ρ‖g‖ + ½ρ² ĝᵀHĝ for a quadratic).  The
max over iterates makes the value non-decreasing in K and never above S_ρ.  If ‖g_k‖ < 1e−12 (stationary
point) a seeded Gaussian unit direction replaces g_k/‖g_k‖.

Cost (one "pass" = one forward + one backward over the batch)
------------------------------------------------------------
* ``loss_surface_1d``: steps + 1 forwards;  ``loss_surface_2d``: steps² + 1 forwards (no backward).
* ``hessian_top_eigenvalue``: 1 forward + 1 backward with graph, then ≤ ``iters`` HVPs (each ≈ 2 backwards),
  ≤ 2·``iters`` when the shifted second run is needed;
  ``hessian_trace``: the same with ``samples`` HVPs.  Memory ≈ 2–3 × a training step (retained graph).
  Measured on CPU for Llama-shaped models: one HVP ≈ 2 × (forward + backward), the graph pass ≈ 2 ×.
* ``worst_case_sharpness``: ``steps`` passes + 1 forward.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

__all__ = [
    "random_directions",
    "loss_surface_1d",
    "loss_surface_2d",
    "surface_sharpness",
    "hessian_top_eigenvalue",
    "hessian_trace",
    "hutchinson_samples",
    "worst_case_sharpness",
    "sharpness_report",
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
    """At least float32 for reductions (float64 kept; no float64 upcast, which some devices lack)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


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


# ---------------------------------------------------------------------------------------------- report
def sharpness_report(model: torch.nn.Module, loss_fn: LossFn, params: Sequence[Tensor] | None = None, *,
                     grid: int = 0, span: float = 1.0, filter_normalize: bool = True, rho: float = 0.05,
                     ascent_steps: int = 1, eig_iters: int = 20, trace_samples: int = 10, seed: int = 0,
                     disable_progress: bool = False) -> dict[str, float]:
    """Scalars: ``base_loss``, ``top_eigenvalue``, ``hessian_trace``, ``worst_case_sharpness`` and, when
    ``grid`` ≥ 3, the ``surface_*`` metrics of ``surface_sharpness`` on a grid × grid ``loss_surface_2d``."""
    if 0 < grid < 3:
        raise ValueError("grid must be 0 (no surface) or >= 3")
    params = _resolve_params(model, params)
    kw = dict(seed=seed, disable_progress=disable_progress)
    with _measuring(model, params), torch.no_grad():
        base_loss = float(_scalar(loss_fn()))
    out: dict[str, float] = {
        "base_loss": base_loss,
        "top_eigenvalue": hessian_top_eigenvalue(model, loss_fn, params, iters=eig_iters, **kw),
        "hessian_trace": hessian_trace(model, loss_fn, params, samples=trace_samples, **kw),
        "worst_case_sharpness": worst_case_sharpness(model, loss_fn, params, rho=rho, steps=ascent_steps, **kw),
    }
    if grid:
        surface = loss_surface_2d(model, loss_fn, params, span=span, steps=grid,
                                  filter_normalize=filter_normalize, **kw)
        out.update({f"surface_{k}": v for k, v in surface_sharpness(surface).items()})
    return out
