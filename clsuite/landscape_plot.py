"""PNG plots of loss surfaces from :mod:`clsuite.flatness` (matplotlib ``Figure`` + Agg canvas, no pyplot state).

A surface is the dict returned by ``loss_surface_2d`` (``alphas``, ``betas``, ``loss[i, j] = f(alphas[i],
betas[j])``, ``base_loss``) or ``loss_surface_1d`` (``alphas``, ``loss``).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from mpl_toolkits.mplot3d import Axes3D  # noqa: F401  (registers the "3d" projection)

__all__ = ["plot_surface", "plot_surfaces_side_by_side"]

_LEVELS = 30


def _new_figure(figsize: tuple[float, float]) -> Figure:
    fig = Figure(figsize=figsize, dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", bbox_inches="tight")
    return path


def _grid(surface: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Meshgrids A, B (indexing="ij") and the loss grid Z."""
    a = np.asarray(surface["alphas"], dtype=float)
    b = np.asarray(surface["betas"], dtype=float)
    z = np.asarray(surface["loss"], dtype=float)
    if z.shape != (len(a), len(b)):
        raise ValueError(f"loss grid shape {z.shape} != (len(alphas), len(betas)) = ({len(a)}, {len(b)})")
    A, B = np.meshgrid(a, b, indexing="ij")
    return A, B, z


def _levels(lo: float, hi: float) -> np.ndarray:
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError("surface contains non-finite losses")
    if hi - lo < 1e-12:
        hi = lo + 1.0
    return np.linspace(lo, hi, _LEVELS)


def _contour(ax: Any, surface: Mapping[str, Any], levels: np.ndarray) -> Any:
    A, B, Z = _grid(surface)
    cf = ax.contourf(A, B, Z, levels=levels, cmap="viridis", extend="both")
    ax.contour(A, B, Z, levels=levels[::3], colors="k", linewidths=0.4, alpha=0.6)
    ax.plot([0.0], [0.0], marker="*", color="red", markersize=10, linestyle="none")
    ax.set_xlabel("α (direction 1)")
    ax.set_ylabel("β (direction 2)")
    ax.set_aspect("equal", adjustable="box")
    return cf


def plot_surface(surface: Mapping[str, Any], path_prefix: str | Path, title: str) -> list[Path]:
    """Write ``<prefix>_contour.png`` and ``<prefix>_3d.png`` for a 2-D surface (``<prefix>_1d.png`` for a 1-D
    one); returns the written paths."""
    prefix = Path(path_prefix)
    if "betas" not in surface:
        a = np.asarray(surface["alphas"], dtype=float)
        z = np.asarray(surface["loss"], dtype=float)
        fig = _new_figure((5.5, 4))
        ax = fig.add_subplot()
        ax.plot(a, z, marker="o", markersize=3)
        ax.axvline(0.0, color="red", linewidth=0.8, linestyle="--")
        ax.set_xlabel("α (direction 1)")
        ax.set_ylabel("loss")
        ax.set_title(title)
        return [_save(fig, prefix.with_name(prefix.name + "_1d.png"))]

    A, B, Z = _grid(surface)
    fig = _new_figure((5.5, 4.5))
    ax = fig.add_subplot()
    cf = _contour(ax, surface, _levels(float(Z.min()), float(Z.max())))
    fig.colorbar(cf, ax=ax, label="loss")
    ax.set_title(title)
    contour_path = _save(fig, prefix.with_name(prefix.name + "_contour.png"))

    fig = _new_figure((6, 5))
    ax3 = fig.add_subplot(projection="3d")
    ax3.plot_surface(A, B, Z, cmap="viridis", linewidth=0, antialiased=True)
    for axis in (ax3.xaxis, ax3.yaxis):
        axis.set_major_locator(MaxNLocator(5))
    ax3.set_xlabel("α")
    ax3.set_ylabel("β")
    ax3.set_zlabel("loss")
    ax3.set_title(title)
    surface_path = _save(fig, prefix.with_name(prefix.name + "_3d.png"))
    return [contour_path, surface_path]


def plot_surfaces_side_by_side(surfaces: Mapping[str, Mapping[str, Any]], path: str | Path, title: str) -> Path:
    """One contour panel per named 2-D surface (e.g. naive vs SAM) sharing axes, one colour scale and colour bar;
    returns the written path."""
    if not surfaces:
        raise ValueError("no surfaces to plot")
    grids = {name: _grid(s)[2] for name, s in surfaces.items()}
    levels = _levels(min(float(z.min()) for z in grids.values()), max(float(z.max()) for z in grids.values()))
    n = len(surfaces)
    fig = _new_figure((4.2 * n + 1.2, 4.4))
    axes = fig.subplots(1, n, squeeze=False, sharex=True, sharey=True)[0]
    cf = None
    for k, (ax, (name, s)) in enumerate(zip(axes, surfaces.items())):
        cf = _contour(ax, s, levels)
        ax.set_title(name)
        if k:
            ax.set_ylabel("")
    fig.colorbar(cf, ax=list(axes), label="loss")
    fig.suptitle(title)
    return _save(fig, Path(path))
