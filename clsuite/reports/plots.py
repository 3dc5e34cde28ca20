"""PNG plots (matplotlib ``Figure`` + Agg canvas, no pyplot state): loss surfaces, the sharpness-forgetting
scatter grid, and the leaderboard's trade-off panels. Every file is written atomically."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from mpl_toolkits.mplot3d import Axes3D  # noqa: F401  (registers the "3d" projection)

from ..atomic import save_figure
from ..stats import t_half_width

_LEVELS = 30


def _new_figure(figsize: tuple[float, float], dpi: int = 110) -> Figure:
    fig = Figure(figsize=figsize, dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    return save_figure(fig, path, bbox_inches="tight")


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


def fmt(x: float | None, digits: int = 3) -> str:
    """A number for a table or title: 3 decimals, 3 significant digits below 1e-3, "" when missing."""
    return "" if x is None or not math.isfinite(x) else f"{x:.{digits}g}" if abs(x) < 1e-3 else f"{x:.{digits}f}"


def scatter_grid(df: Any, sharp: list[str], forget: list[str], pairs: list[dict], path: Path, prefix: str) -> None:
    """One scatter panel per (sharpness, forgetting) pair, points coloured by strategy, n and ρ in the title."""
    strategies = sorted(df["strategy"].unique())
    colours = {s: f"C{i % 10}" for i, s in enumerate(strategies)}
    fig = _new_figure((3.3 * len(forget), 2.9 * len(sharp)), dpi=100)
    axes = fig.subplots(len(sharp), len(forget), squeeze=False)
    by_pair = {(p["sharpness"], p["metric"]): p for p in pairs}
    for i, s in enumerate(sharp):
        for j, m in enumerate(forget):
            ax, p = axes[i][j], by_pair[(s, m)]
            for strat in strategies:
                sub = df[(df["strategy"] == strat) & df[s].notna() & df[m].notna()]
                ax.scatter(sub[s], sub[m], s=18, color=colours[strat], label=strat)
            within = f", within ρ={fmt(p['within_spearman'], 2)}" if math.isfinite(p["within_spearman"]) else ""
            ax.set_title(f"n={p['n']}, ρ={fmt(p['spearman'], 2) or 'n/a'}{within}", fontsize=9)
            ax.set_xlabel(s.removeprefix(prefix), fontsize=8)
            ax.set_ylabel(m, fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=min(len(strategies), 5), fontsize=8,
               bbox_to_anchor=(0.5, 1.0))
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    save_figure(fig, path)


TRADE_OFFS = {"forgetting": "forgetting ↓ (mean drop from best earlier score)",
              "probe_retention": "probe retention ↑ (mean change of general-ability probes)"}


def plot_trade_offs(agg: Any, runs: Any, path: Path, title: str, label: Callable[[str, str], str]) -> None:
    """Task score against forgetting of the stream's tasks and of its probes: one panel each (when measured),
    every run a dot, each strategy's mean ± 95% t interval a bar, so strategies are compared at matched learning."""
    xs = [x for x in TRADE_OFFS if x in agg and agg[x].notna().any()] or ["acc"]
    fig = _new_figure((6.5 * len(xs), 5), dpi=120)
    axes = fig.subplots(1, len(xs), squeeze=False)
    for ax, x in zip(axes[0], xs):
        for k, (_, r) in enumerate(agg.iterrows()):
            c = f"C{k % 10}"
            mine = runs[(runs.strategy == r["strategy"]) & (runs.tag == r["tag"])]
            ax.scatter(mine[x], mine["acc"], s=12, color=c, alpha=0.5)
            many = r["n"] > 1
            n = int(r["n"])
            ax.errorbar(r[x], r["acc"], xerr=t_half_width(r.get(f"{x}_std"), n) if many else None,
                        yerr=t_half_width(r.get("acc_std"), n) if many else None, fmt="o", capsize=3, color=c)
            ax.annotate(f"{label(r['strategy'], r['tag'])} (n={int(r['n'])})", (r[x], r["acc"]),
                        fontsize=7, xytext=(4, 4), textcoords="offset points")
        ax.set_xlabel(TRADE_OFFS.get(x, x))
        ax.set_ylabel("ACC ↑ (mean final score over tasks)")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)
