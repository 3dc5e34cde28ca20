"""Aggregate run records into ranked tables (mean ± 95% t half-width over seeds): markdown, CSV and a plot."""
from __future__ import annotations

import html
import json
import zipfile
import zlib
from pathlib import Path
from typing import NamedTuple, Sequence

import pandas as pd
from tabulate import tabulate

from ..atomic import write_text
from ..errors import UserError, did_you_mean
from ..fingerprint import PARTS, config_digest, describe
from ..metrics import METRICS, shown_metrics
from ..stats import paired_test, t_half_width
from ..records import SCHEMA_VERSION, RunRecord, find_records, record_from, read_record, run_sharpness
from .plots import plot_trade_offs

# Columns of the markdown table (the CSV keeps every metric).
COST = {"compute_multiplier": ("compute ×", False), "extra_memory_bytes": ("extra MiB", False)}


# The largest archive member read as a record (a record with per-item details of a large stream is a few MiB).
MAX_MEMBER_BYTES = 256 * 2**20


class Found(NamedTuple):
    """A record and where it came from: ``where`` is its file (a Path) or ``archive.zip:member`` (a str);
    ``source`` is the path given (a directory, file or archive) that holds it."""
    where: Path | str
    source: str
    record: RunRecord


def read_sources(paths: list[Path]) -> list[Found]:
    """Every record under ``paths`` (files, directories, .zip archives of them), each schema-validated; an archive is
    read in memory, never extracted."""
    found = []
    for p in map(Path, paths):
        if p.suffix.lower() == ".zip" and p.is_file():
            found += [Found(w, str(p), r) for w, r in _zip_records(p)]
        else:
            found += [Found(f, str(p), read_record(f)) for f in find_records([p])]
    return found


def _zip_records(path: Path) -> list[tuple[str, RunRecord]]:
    """(``archive:member``, record) for each record in a zip archive; its hidden files and saved models and
    checkpoints are skipped as in a directory, any other member that is not a record is a UserError."""
    out = []
    try:
        with zipfile.ZipFile(path) as zf:
            for info in sorted(zf.infolist(), key=lambda i: i.filename):
                parts = info.filename.split("/")
                if info.is_dir() or any(d.startswith(".") or d.endswith((".model", ".ckpt")) for d in parts[:-1]) \
                        or parts[-1].startswith("."):
                    continue
                where = f"{path}:{_printable(info.filename)}"
                if not info.filename.endswith(".json"):
                    raise UserError(f"{path} holds {_printable(info.filename)}, which is not a run record (.json): "
                                    "zip only run records (a folder of them), or remove it from the archive")
                if info.file_size > MAX_MEMBER_BYTES:
                    raise UserError(f"record {where} is {info.file_size / 2**20:.0f} MiB, more than a run record "
                                    f"({MAX_MEMBER_BYTES // 2**20} MiB at most): remove it from the archive")
                with zf.open(info) as f:
                    data = f.read(MAX_MEMBER_BYTES + 1)
                out.append((where, parse_record(data, where)))
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, RuntimeError, NotImplementedError, OSError,
            EOFError, ValueError) as e:  # corrupt, encrypted, or compressed in a way zipfile cannot read
        raise UserError(f"{path} cannot be read as a .zip archive ({_printable(str(e))}): give a zip of run-record "
                        ".json files, or their folder") from None
    return out


def _printable(text: str) -> str:
    return text if text.isprintable() else repr(text)


def parse_record(data: bytes, where: str) -> RunRecord:
    """Parse and validate one record's bytes (an archive member); a malformed one is a UserError naming ``where``."""
    if len(data) > MAX_MEMBER_BYTES:
        raise UserError(f"record {where} is larger than a run record ({MAX_MEMBER_BYTES // 2**20} MiB at most): "
                        "remove it from the archive")
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, huge integers, deep nesting
        raise UserError(f"record {where} is not valid JSON ({_printable(str(e))}); remove it from the "
                        "archive") from None
    return record_from(obj, where)


def load_sourced(paths: list[Path], prefer: Sequence[str] = ()) -> list[Found]:
    """The records under ``paths`` to rank, complete and failed, checked as ``load_records`` says."""
    sources = list(dict.fromkeys(str(Path(p)) for p in paths))
    order = []
    for p in map(str, prefer):
        if str(Path(p)) not in sources:
            raise UserError(f"--prefer {p}: not one of the sources given; {did_you_mean(p, sources)}"
                            f"give one of {', '.join(sources)} as written")
        order.append(str(Path(p)))
    found = read_sources(paths)
    if not found:
        raise UserError(f"no run records under {', '.join(map(str, paths))}: run 'clsuite run' first")
    return check_found(found, order)


def check_found(found: list[Found], prefer: Sequence[str] = ()) -> list[Found]:
    """``found`` with one record per cell (``prefer``: source order, as given), checked to rank together."""
    kept = _one_per_cell(found, [str(Path(p)) for p in prefer])
    _check_fingerprints([x.where for x in kept], [x.record for x in kept])
    return kept


def _one_per_cell(found: list[Found], prefer: list[str]) -> list[Found]:
    """One record per cell (stream, strategy, tag, seed, split): a cell counted twice would shrink the spread and
    inflate n. Twice in one source is an error; in two sources, the one ``prefer`` names first wins."""
    def cell(r: RunRecord) -> tuple:
        return r.stream, r.strategy, r.tag, r.seed, r.split

    def what(r: RunRecord) -> str:
        split = f" ({r.split})" if r.split != "test" else ""
        return f"{row_label(r.strategy, r.tag)} seed {r.seed} on {r.stream}{split}"

    within: dict[tuple, Found] = {}
    for x in found:
        y = within.setdefault((x.source, cell(x.record)), x)
        if y is not x:
            raise UserError(f"{y.where} and {x.where} are both {what(x.record)}: give each run once (remove one of "
                            f"them from {x.source})")
    kept: dict[tuple, Found] = {}
    for x in found:
        y = kept.setdefault(cell(x.record), x)
        if y is x:
            continue
        ranked = [s for s in prefer if s in (x.source, y.source)]
        if not ranked:
            raise UserError(f"{y.where} and {x.where} are both {what(x.record)}, from two sources: pass --prefer "
                            f"{y.source} or --prefer {x.source} to say which counts, or give only one of them")
        kept[cell(x.record)] = x if ranked[0] == x.source else y
    return list(kept.values())


def load_records(paths: list[Path], prefer: Sequence[str] = ()) -> tuple[list[RunRecord], list[RunRecord]]:
    """(complete, failed) records under ``paths`` (files, directories, .zip archives), every one schema-validated
    before use; a cell given twice by two sources counts once, from the source ``prefer`` names first (else it is
    refused, naming both)."""
    recs = [x.record for x in load_sourced(paths, prefer)]
    return [r for r in recs if r.status == "complete"], [r for r in recs if r.status == "failed"]


def _check_fingerprints(files: list[Path | str], recs: list[RunRecord]) -> None:
    """Records ranked together must be of the same cell but for the seed: one data, scoring, schema and split per
    stream, one config per row; a record of an older schema must be migrated (or re-run) first."""
    first: dict[tuple, tuple[Path | str, RunRecord, dict]] = {}
    splits: dict[str, tuple[Path | str, str]] = {}
    bases: dict[str, tuple[Path | str, str]] = {}
    for f, r in zip(files, recs):
        if r.schema_version != SCHEMA_VERSION:
            how = f"'clsuite migrate {f.parent}'" if isinstance(f, Path) else "'clsuite migrate' on it unzipped"
            raise UserError(f"{f} is a schema v{r.schema_version} record (this clsuite writes v{SCHEMA_VERSION}): run "
                            f"{how}, which upgrades it if the stream's data is unchanged, or re-run it")
        f0, split = splits.setdefault(r.stream, (f, r.split))
        if split != r.split:
            raise UserError(f"{f0} scored the {split} split and {f} the {r.split} split of {r.stream}: a leaderboard "
                            "reports one split (test); rank them apart")
        if base := r.provenance.get("base_weights"):  # records made before it was recorded carry none
            f0, base0 = bases.setdefault(r.stream, (f, base))
            if base0 != base:
                raise UserError(f"{f0} and {f} started from other base weights ({base0[:12]} and {base[:12]}) on "
                                f"{r.stream}: rebuild the model where the others were made, re-run one group, or rank "
                                "them apart")
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


def frame(records: list[RunRecord], sources: list[str] | None = None) -> pd.DataFrame:
    """One row per run: stream, strategy, tag (a sweep's hyper-parameters), seed, every metric, cost; and the
    run's source when ``sources`` (one per record) is given."""
    rows = []
    for i, r in enumerate(records):
        row = {"stream": r.stream, "strategy": r.strategy, "tag": r.tag, "seed": r.seed, **r.metrics}
        if sources is not None:
            row["source"] = sources[i]
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
    if "source" in df.columns:  # the sources a row's runs came from
        out.insert(1, "source", g["source"].agg(lambda s: ", ".join(sorted(set(s)))))
    out = out.sort_values(sort_by, ascending=not METRICS.get(sort_by).higher_is_better, na_position="last")
    return out.reset_index()


def _sharp(df: pd.DataFrame) -> list[str]:
    return sorted(c for c in df.columns if c.startswith("sharpness_") and not c.endswith("_std"))


def _escape(text: str) -> str:
    """Record text is untrusted: neutralise markdown table and HTML syntax."""
    return html.escape(str(text)).replace("|", "&#124;").replace("\n", " ").replace("\r", " ")


def to_markdown(agg: pd.DataFrame, digits: int = 3) -> str:
    source = "source" in agg.columns
    headers, cols = ["rank", "strategy", *(["source"] if source else []), "n"], []
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
        cells = [i + 1, _escape(row_label(row["strategy"], row["tag"])), *([_escape(row["source"])] if source else []),
                 int(row["n"])]
        for c in cols:
            v, s = row[c], row.get(f"{c}_std")
            if pd.isna(v):
                cells.append("–")
            elif pd.isna(s) or c in COST:
                cells.append(f"{v:.{digits}f}" if c != "compute_multiplier" else f"{v:.2f}")
            else:
                cells.append(f"{v:.{digits}f} ± {t_half_width(s, int(row['n'])):.{digits}f}")
        table.append(cells)
    return tabulate(table, headers=headers, tablefmt="github", disable_numparse=True)


def paired_effects(df: pd.DataFrame, plugin: str = "sam", metrics: tuple[str, ...] | None = None) -> pd.DataFrame:
    """Effect of adding ``plugin``: per-seed differences (X+plugin minus X, same stream, tag and seed), mean ± 95% t
    half-width (p of the paired t test); ``metrics``: the registry's shown metrics by default."""
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
                t = paired_test(list(both[m]), list(both[f"{m}_base"]))
                row[m] = f"{t.mean:+.3f} ± {(t.hi - t.lo) / 2:.3f} (p {t.p:.2f})" if t.n > 1 else f"{t.mean:+.3f}"
        rows.append(row)
    return pd.DataFrame(rows)


def publish(paths: list[Path], out_root: Path, sort_by: str = "acc", prefer: Sequence[str] = ()) -> dict[str, str]:
    """Write ``<out_root>/<stream>/leaderboard.{md,csv,png}``; returns the markdown per stream. With records from
    more than one source each row names its sources; ``prefer``: as for ``load_records``."""
    found = load_sourced(paths, prefer)
    done = [x for x in found if x.record.status == "complete"]
    complete, failed = [x.record for x in done], [x.record for x in found if x.record.status == "failed"]
    if not complete:
        raise UserError("every record found is a failed run: nothing to rank")
    sources = [x.source for x in done] if len({x.source for x in done}) > 1 else None
    agg = aggregate(frame(complete, sources), sort_by)
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
            md += ("\n\nEffect of adding sam, paired by seed (mean per-seed difference ± the half-width of its 95% t "
                   "interval, and the paired t p-value, not adjusted for multiple comparisons):\n\n"
                   + tabulate(eff.values.tolist(), headers=list(eff.columns), tablefmt="github",
                              disable_numparse=True))
        fails = [f"{_escape(row_label(r.strategy, r.tag))} seed {r.seed}" for r in failed if r.stream == stream]
        note = f"\n\nFailed runs (not ranked): {', '.join(fails)}" if fails else ""
        val = any(r.split == "val" for r in complete if r.stream == stream)  # one split per stream (checked)
        split = " (validation split: for tuning, not for reporting)" if val else ""
        text = (f"# Leaderboard: {_escape(stream)}{split}\n\nMean ± half-width of the 95% Student t interval over seeds "
                f"(n = runs; no interval for n = 1). "
                f"Ranked by {sort_by}. ↑ higher is better, ↓ lower is better.\n\n{md}{note}\n")
        write_text(d / "leaderboard.md", text)
        write_text(d / "leaderboard.csv", sub.to_csv(index=False))
        plot_trade_offs(sub, runs, d / "leaderboard.png", f"{stream}: task score against forgetting", row_label)
        tables[stream] = md
    return tables
