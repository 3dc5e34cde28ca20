"""Aggregate run records into ranked tables (mean ± std over seeds): markdown, CSV and a plot."""
from __future__ import annotations

import html
from pathlib import Path

import pandas as pd
from tabulate import tabulate

from ..atomic import write_text
from ..errors import UserError
from ..fingerprint import PARTS, config_digest, describe
from ..metrics import METRICS, shown_metrics
from ..records import RunRecord, find_records, read_record, run_sharpness
from .plots import plot_trade_offs

# Columns of the markdown table (the CSV keeps every metric).
COST = {"compute_multiplier": ("compute ×", False), "extra_memory_bytes": ("extra MiB", False)}


def load_records(paths: list[Path]) -> tuple[list[RunRecord], list[RunRecord]]:
    """(complete, failed) records under ``paths``; every file is schema-validated before use."""
    files = find_records(paths)
    recs = [read_record(p) for p in files]
    if not recs:
        raise UserError(f"no run records under {', '.join(map(str, paths))}: run 'clsuite run' first")
    seen: dict[tuple, Path] = {}
    for f, r in zip(files, recs):  # a cell counted twice would shrink the spread and inflate n
        key = (r.stream, r.strategy, r.tag, r.seed)
        if key in seen:
            raise UserError(f"{seen[key]} and {f} are both {row_label(r.strategy, r.tag)} seed {r.seed} on "
                            f"{r.stream}: give each run once (pass only one of the directories)")
        seen[key] = f
    _check_fingerprints(files, recs)
    return [r for r in recs if r.status == "complete"], [r for r in recs if r.status == "failed"]


def _check_fingerprints(files: list[Path], recs: list[RunRecord]) -> None:
    """Records ranked together must be of the same cell but for the seed: one data, scoring and schema per stream,
    one config per row; a record without fingerprint (schema v1) must be migrated first."""
    first: dict[tuple, tuple[Path, RunRecord, dict]] = {}
    for f, r in zip(files, recs):
        if r.fingerprint is None:
            raise UserError(f"{f} is a schema v{r.schema_version} record without a fingerprint: run 'clsuite "
                            f"migrate {f.parent}' if its data and scoring did not change since it was made, "
                            "or re-run it")
        fp = {**r.fingerprint, "config": config_digest(r.config)}  # its config validated: new settings at defaults
        for key, parts in (((r.stream,), [p for p in PARTS if p != "config"]),
                           ((r.stream, r.strategy, r.tag), ["config"])):
            f0, r0, fp0 = first.setdefault(key, (f, r, fp))
            odd = [p for p in parts if fp0.get(p) != fp.get(p)]
            if odd:
                what = f"{row_label(r.strategy, r.tag)}" if len(key) > 1 else f"stream {r.stream}"
                raise UserError(f"{f0} and {f} ({what}) were made with other {describe(odd)}: re-run the stale "
                                "one, or rank them apart")


def row_label(strategy: str, tag: str) -> str:
    """A leaderboard row's name: the strategy, and a sweep cell's hyper-parameters in brackets."""
    return f"{strategy} [{tag}]" if tag else strategy


def frame(records: list[RunRecord]) -> pd.DataFrame:
    """One row per run: stream, strategy, tag (a sweep's hyper-parameters), seed, every metric, cost."""
    rows = []
    for r in records:
        row = {"stream": r.stream, "strategy": r.strategy, "tag": r.tag, "seed": r.seed, **r.metrics}
        row["compute_multiplier"] = r.cost.get("compute_multiplier")
        row["extra_memory_bytes"] = (r.cost.get("extra_memory_bytes") or 0) / 2**20
        row.update(run_sharpness(r))
        row.update(category_retention(r))
        rows.append(row)
    return pd.DataFrame(rows)


def category_retention(r: RunRecord) -> dict[str, float]:
    """``Δ <category>``: mean over the category's probes of P[T, p] − P[0, p] (the paper reports ΔAVG by category)."""
    if r.status != "complete" or not r.probes:
        return {}
    by_cat: dict[str, list[float]] = {}
    for i, p in enumerate(r.probes):
        by_cat.setdefault(r.probe_categories.get(p, p), []).append(r.P[-1][i] - r.P[0][i])
    return {f"Δ {c}": sum(v) / len(v) for c, v in sorted(by_cat.items())}


def _cats(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if c.startswith("Δ ") and not c.endswith("_std")]


def aggregate(df: pd.DataFrame, sort_by: str = "acc") -> pd.DataFrame:
    """Mean and std over seeds per (stream, strategy, tag), ranked by ``sort_by`` in its better direction."""
    if sort_by not in METRICS:
        raise UserError(f"cannot sort by {sort_by!r}: choose one of {', '.join(METRICS.names())}")
    cols = [m for m in METRICS.names() if m in df.columns] + _cats(df) + list(COST) + _sharp(df)
    g = df.groupby(["stream", "strategy", "tag"])
    out = g[cols].mean().join(g[cols].std(ddof=1).add_suffix("_std"))
    out.insert(0, "n", g.size())
    out = out.sort_values(sort_by, ascending=not METRICS.get(sort_by).higher_is_better, na_position="last")
    return out.reset_index()


def _sharp(df: pd.DataFrame) -> list[str]:
    return sorted(c for c in df.columns if c.startswith("sharpness_") and not c.endswith("_std"))


def _escape(text: str) -> str:
    """Record text is untrusted: neutralise markdown table and HTML syntax."""
    return html.escape(str(text)).replace("|", "&#124;").replace("\n", " ").replace("\r", " ")


def to_markdown(agg: pd.DataFrame, digits: int = 3) -> str:
    headers, cols = ["rank", "strategy", "n"], []
    for m in [m for m in shown_metrics() if m in agg.columns and agg[m].notna().any()]:  # e.g. no BWT with one task
        arrow = "↑" if METRICS.get(m).higher_is_better else "↓"
        headers.append(f"{m} {arrow}")
        cols.append(m)
    cats = _cats(agg)
    for c in cats if len(cats) > 1 else []:  # one category: the same number as probe_retention
        headers.append(f"{c} ↑")
        cols.append(c)
    for c in _sharp(agg):  # lower is flatter
        headers.append(f"{c} ↓")
        cols.append(c)
    for c, (label, hib) in COST.items():
        headers.append(f"{label} {'↑' if hib else '↓'}")
        cols.append(c)
    table = []
    for i, row in agg.iterrows():
        cells = [i + 1, _escape(row_label(row["strategy"], row["tag"])), int(row["n"])]
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


def paired_effects(df: pd.DataFrame, plugin: str = "sam", metrics: tuple[str, ...] | None = None) -> pd.DataFrame:
    """Effect of adding ``plugin``: per-seed differences (X+plugin minus X, same stream, tag and seed), mean ± std;
    ``metrics``: the registry's shown metrics by default."""
    metrics = shown_metrics() if metrics is None else metrics
    rows = []
    for (stream, strategy, tag), with_p in df.groupby(["stream", "strategy", "tag"]):
        parts = strategy.split("+")
        if plugin not in [x.split("(")[0] for x in parts] or len(parts) < 1:
            continue
        base = "+".join(x for x in parts if x.split("(")[0] != plugin) or "naive"
        without = df[(df.stream == stream) & (df.strategy == base) & (df.tag == tag)]
        both = with_p.merge(without, on="seed", suffixes=("", "_base"))
        if both.empty:
            continue
        comparison = f"{row_label(strategy, tag)} − {row_label(base, tag)}"
        row = {"stream": stream, "comparison": comparison, "n": len(both)}
        for m in metrics:
            if m in both and both[m].notna().all():
                d = both[m] - both[f"{m}_base"]
                row[m] = f"{d.mean():+.3f} ± {d.std(ddof=1):.3f}" if len(d) > 1 else f"{d.mean():+.3f}"
        rows.append(row)
    return pd.DataFrame(rows)


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
        runs = frame([r for r in complete if r.stream == stream])
        effects = paired_effects(runs)
        if not effects.empty:
            eff = effects.drop(columns="stream")
            eff["comparison"] = eff["comparison"].map(_escape)
            md += ("\n\nEffect of adding sam, paired by seed (mean ± std of the per-seed difference; "
                   "a difference is only worth reading when its mean clearly exceeds its std):\n\n"
                   + tabulate(eff.values.tolist(), headers=list(eff.columns), tablefmt="github",
                              disable_numparse=True))
        fails = [f"{_escape(row_label(r.strategy, r.tag))} seed {r.seed}" for r in failed if r.stream == stream]
        note = f"\n\nFailed runs (not ranked): {', '.join(fails)}" if fails else ""
        text = (f"# Leaderboard: {_escape(stream)}\n\nMean ± std over seeds (n = runs). "
                f"Ranked by {sort_by}. ↑ higher is better, ↓ lower is better.\n\n{md}{note}\n")
        write_text(d / "leaderboard.md", text)
        write_text(d / "leaderboard.csv", sub.to_csv(index=False))
        plot_trade_offs(sub, runs, d / "leaderboard.png", f"{stream}: task score against forgetting", row_label)
        tables[stream] = md
    return tables
