"""Sharpness scalars of a model at its current weights, on a fixed batch (the in-run ``--sharpness`` measurement)."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from . import flatness as fl
from .data import lm_loss
from .records import finite_or_none

PREFIX = "sharpness_"
LEVELS = ("worst", "cheap", "full")
# Settings of the scalars (fixed, so numbers are comparable between runs).
RHO, ASCENT_STEPS, TRACE_SAMPLES, EIG_ITERS, GRID, SPAN = 0.05, 1, 5, 10, 7, 1.0


def first_rows(data: Any, n: int) -> list[dict]:
    """The first ``n`` rows of a dataset (deterministic), as dicts."""
    if n < 1:
        raise ValueError("n_examples must be >= 1")
    return [dict(data[i]) for i in range(min(n, len(data)))]


def sharpness_scalars(model: torch.nn.Module, loss_fn: Callable[[], torch.Tensor],
                      params: Sequence[torch.Tensor] | None = None, level: str = "cheap",
                      seed: int = 0) -> dict[str, float | None]:
    """``sharpness_*`` scalars of a fixed-batch loss: ``worst``: worst-case (ρ=0.05, 1 step); ``cheap`` adds the
    Hutchinson trace (5 samples), ``full`` the top eigenvalue (10 iters) and 7×7 filter-normalized surface metrics.
    Non-finite values -> None."""
    if level not in LEVELS:
        raise ValueError(f"sharpness level {level!r}: choose one of {', '.join(LEVELS)}")
    kw: dict[str, Any] = dict(seed=seed, disable_progress=True)
    out = {"worst": fl.worst_case_sharpness(model, loss_fn, params, rho=RHO, steps=ASCENT_STEPS, **kw)}
    if level != "worst":
        out["trace"] = fl.hessian_trace(model, loss_fn, params, samples=TRACE_SAMPLES, **kw)
    if level == "full":
        out["top_eig"] = fl.hessian_top_eigenvalue(model, loss_fn, params, iters=EIG_ITERS, **kw)
        surface = fl.loss_surface_2d(model, loss_fn, params, span=SPAN, steps=GRID, filter_normalize=True, **kw)
        out.update(fl.surface_sharpness(surface))
    return {PREFIX + k: finite_or_none(v) for k, v in out.items()}


def measure_sharpness(ctx: Any, level: str = "cheap", n_examples: int = 32, seed: int = 0) -> dict[str, float | None]:
    """Sharpness scalars of ``ctx.model`` on the first ``n_examples`` train rows of ``ctx.task``; weights, modes,
    ``.grad`` and the global RNG are left as found."""
    if ctx.task is None or ctx.task.train is None:
        raise ValueError("measure_sharpness needs ctx.task with a train split (call it after an experience)")
    batch = ctx.collate(first_rows(ctx.task.train, n_examples))  # same as ctx.loss(rows), tokenized once
    return sharpness_scalars(ctx.model, lambda: lm_loss(ctx.model, batch), ctx.trainable_parameters(), level, seed)
