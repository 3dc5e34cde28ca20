"""Aggregate run records into ranked tables (mean ± std over seeds): markdown, CSV and a plot."""
from __future__ import annotations

import html
from pathlib import Path

import pandas as pd
from tabulate import tabulate

from .errors import UserError
from .metrics import METRICS
from .records import RunRecord, find_records, read_record, run_sharpness

# Columns of the markdown table (the CSV keeps every metric).
SHOWN = ("acc", "bwt", "fwt", "forgetting", "plasticity", "probe_retention", "probe_fg")
COST = {"compute_multiplier": ("compute ×", False), "extra_memory_bytes": ("extra MiB", False)}


def load_records(paths: list[Path]) -> tuple[list[RunRecord], list[RunRecord]]:
    """(complete, failed) records under ``paths``; every file is schema-validated before use."""
    files = find_records(paths)
    recs = [read_record(p) for p in files]
    if not recs:
        raise UserError(f"no run records under {', '.join(map(str, paths))}: run 'clsuite run' first")
    seen: dict[tuple, Path] = {}
    for f, r in zip(files, recs):  # a cell counted twice would shrink the spread and inflate n
        key = (r.stream, r.strategy, r.seed)
        if key in seen:
            raise UserError(f"{seen[key]} and {f} are both {r.strategy} seed {r.seed} on {r.stream}: "
                            "give each run once (pass only one of the directories)")
        seen[key] = f
    return [r for r in recs if r.status == "complete"], [r for r in recs if r.status == "failed"]


def frame(records: list[RunRecord]) -> pd.DataFrame:
    """One row per run: stream, strategy, seed, every metric, cost."""
    rows = []
    for r in records:
        row = {"stream": r.stream, "strategy": r.strategy, "seed": r.seed, **r.metrics}
        row["compute_multiplier"] = r.cost.get("compute_multiplier")
        row["extra_memory_bytes"] = (r.cost.get("extra_memory_bytes") or 0) / 2**20
        row.update(run_sharpness(r))
        rows.append(row)
    return pd.DataFrame(rows)


def aggregate(df: pd.DataFrame, sort_by: str = "acc") -> pd.DataFrame:
    """Mean and std over seeds per (stream, strategy), ranked by ``sort_by`` in its better direction."""
    if sort_by not in METRICS:
        raise UserError(f"cannot sort by {sort_by!r}: choose one of {', '.join(METRICS)}")
    cols = [m for m in METRICS if m in df.columns] + list(COST) + _sharp(df)
    g = df.groupby(["stream", "strategy"])
    out = g[cols].mean().join(g[cols].std(ddof=1).add_suffix("_std"))
    out.insert(0, "n", g.size())
    out = out.sort_values(sort_by, ascending=not METRICS[sort_by].higher_is_better, na_position="last")
    return out.reset_index()


def _sharp(df: pd.DataFrame) -> list[str]:
    return sorted(c for c in df.columns if c.startswith("sharpness_") and not c.endswith("_std"))


def _escape(text: str) -> str:
    """Record text is untrusted: neutralise markdown table and HTML syntax."""
    return html.escape(str(text)).replace("|", "&#124;").replace("\n", " ").replace("\r", " ")


def to_markdown(agg: pd.DataFrame, digits: int = 3) -> str:
    headers, cols = ["rank", "strategy", "n"], []
    for m in [m for m in SHOWN if m in agg.columns]:
        arrow = "↑" if METRICS[m].higher_is_better else "↓"
        headers.append(f"{m} {arrow}")
        cols.append(m)
    for c in _sharp(agg):  # lower is flatter
        headers.append(f"{c} ↓")
        cols.append(c)
    for c, (label, hib) in COST.items():
        headers.append(f"{label} {'↑' if hib else '↓'}")
        cols.append(c)
    table = []
    for i, row in agg.iterrows():
        cells = [i + 1, _escape(row["strategy"]), int(row["n"])]
        for c in cols:
            v, s = row[c], row.get(f"{c}_std")
            if pd.isna(v):
                cells.append("–")
            elif pd.isna(s) or c in COST:
                cells.append(f"{v:.{digits}f}" if c != "compute_multiplier" else f"{v:.2f}")
            else:
                cells.append(f"{v:.{digits}f} ± {s:.{digits}f}")
        table.append(cells)
    return tabulate(table, headers=headers, tablefmt="github", disable_numparse=True)


def paired_effects(df: pd.DataFrame, plugin: str = "sam", metrics: tuple[str, ...] = SHOWN) -> pd.DataFrame:
    """Effect of adding ``plugin``: per-seed differences (X+plugin minus X, same stream and seed), mean ± std."""
    rows = []
    for (stream, strategy), with_p in df.groupby(["stream", "strategy"]):
        parts = strategy.split("+")
        if plugin not in [x.split("(")[0] for x in parts] or len(parts) < 1:
            continue
        base = "+".join(x for x in parts if x.split("(")[0] != plugin) or "naive"
        without = df[(df.stream == stream) & (df.strategy == base)]
        both = with_p.merge(without, on="seed", suffixes=("", "_base"))
        if both.empty:
            continue
        row = {"stream": stream, "comparison": f"{strategy} − {base}", "n": len(both)}
        for m in metrics:
            if m in both and both[m].notna().all():
                d = both[m] - both[f"{m}_base"]
                row[m] = f"{d.mean():+.3f} ± {d.std(ddof=1):.3f}" if len(d) > 1 else f"{d.mean():+.3f}"
        rows.append(row)
    return pd.DataFrame(rows)


def plot(agg: pd.DataFrame, path: Path, title: str) -> None:
    """ACC against forgetting per strategy, with seed std as error bars."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 5))
    for _, r in agg.iterrows():
        ax.errorbar(r["forgetting"], r["acc"], xerr=r.get("forgetting_std") if r["n"] > 1 else None,
                    yerr=r.get("acc_std") if r["n"] > 1 else None, fmt="o", capsize=3)
        ax.annotate(f"{r['strategy']} (n={int(r['n'])})", (r["forgetting"], r["acc"]), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("forgetting ↓ (mean drop from best earlier score)")
    ax.set_ylabel("ACC ↑ (mean final score over tasks)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name("." + path.name)
    fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    tmp.replace(path)


def publish(paths: list[Path], out_root: Path, sort_by: str = "acc") -> dict[str, str]:
    """Write ``<out_root>/<stream>/leaderboard.{md,csv,png}``; returns the markdown per stream."""
    complete, failed = load_records(paths)
    if not complete:
        raise UserError("every record found is a failed run: nothing to rank")
    agg = aggregate(frame(complete), sort_by)
    tables = {}
    for stream, sub in agg.groupby("stream", sort=False):
        sub = sub.reset_index(drop=True)
        d = Path(out_root) / stream
        d.mkdir(parents=True, exist_ok=True)
        md = to_markdown(sub)
        effects = paired_effects(frame([r for r in complete if r.stream == stream]))
        if not effects.empty:
            eff = effects.drop(columns="stream")
            eff["comparison"] = eff["comparison"].map(_escape)
            md += ("\n\nEffect of adding sam, paired by seed (mean ± std of the per-seed difference; "
                   "a difference is only worth reading when its mean clearly exceeds its std):\n\n"
                   + tabulate(eff.values.tolist(), headers=list(eff.columns), tablefmt="github",
                              disable_numparse=True))
        fails = [f"{_escape(r.strategy)} seed {r.seed}" for r in failed if r.stream == stream]
        note = f"\n\nFailed runs (not ranked): {', '.join(fails)}" if fails else ""
        text = (f"# Leaderboard: {_escape(stream)}\n\nMean ± std over seeds (n = runs). "
                f"Ranked by {sort_by}. ↑ higher is better, ↓ lower is better.\n\n{md}{note}\n")
        tmp = d / ".leaderboard.md"
        tmp.write_text(text)
        tmp.replace(d / "leaderboard.md")
        csv_tmp = d / ".leaderboard.csv"
        sub.to_csv(csv_tmp, index=False)
        csv_tmp.replace(d / "leaderboard.csv")
        plot(sub, d / "leaderboard.png", f"{stream}: ACC vs forgetting")
        tables[stream] = md
    return tables
