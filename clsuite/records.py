"""Run records: one schema-versioned JSON file per run, written atomically and validated when read."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict

from .atomic import write_json
from .config import RunConfig
from .errors import UserError, error_location, pydantic_message
from .fingerprint import PARTS, describe, fingerprint
from .metrics import compute_metrics

if TYPE_CHECKING:
    from .streams import Stream

# 2: records carry a fingerprint (clsuite.fingerprint); v1 ones are read, then migrated. 3: tasks have validation rows
# held out of their training rows, records say which split they scored and keep per-item results; v2 ones are read
# for showing only (their training rows differ: re-run them)
SCHEMA_VERSION = 3


class RunRecord(BaseModel):
    """The schema every leaderboard input must satisfy (extra keys allowed for forward compatibility)."""
    model_config = ConfigDict(extra="allow")
    schema_version: Literal[1, 2, 3]  # new records are 3; older ones are read only to be migrated or shown
    status: Literal["complete", "failed"]
    stream: str
    strategy: str
    tag: str = ""  # a sweep cell's hyper-parameters, e.g. "lr=0.0002,steps=20"; "" outside sweeps
    seed: int
    model: str
    config: dict[str, Any]
    tasks: list[str]
    probes: list[str]
    probe_categories: dict[str, str] = {}
    R: list[list[float]]
    P: list[list[float]]
    metrics: dict[str, float | None]
    cost: dict[str, float | int | None] = {}
    experiences: list[dict[str, Any]] = []
    provenance: dict[str, Any] = {}
    error: str | None = None
    split: Literal["test", "val"] = "test"  # what was scored (records before schema 3: test)
    wall_seconds: float | None = None
    fingerprint: dict[str, str] | None = None  # what determines the numbers (clsuite.fingerprint); required in v2

    @pydantic.model_validator(mode="after")
    def _fingerprinted(self) -> "RunRecord":
        if self.schema_version >= 2 and (self.fingerprint is None or not set(PARTS) <= set(self.fingerprint)):
            raise ValueError(f"a schema v{self.schema_version} record needs its fingerprint, with {', '.join(PARTS)}")
        return self

    @pydantic.model_validator(mode="after")
    def _shapes(self) -> "RunRecord":
        if self.status == "complete":
            t = len(self.tasks)
            if len(self.R) != t + 1 or any(len(r) != t for r in self.R):
                raise ValueError(f"R must be {t + 1} x {t} for {t} tasks")
            if len(self.P) != t + 1 or any(len(r) != len(self.probes) for r in self.P):
                raise ValueError(f"P must be {t + 1} x {len(self.probes)}")
            if any(not math.isfinite(x) for row in self.R + self.P for x in row):
                raise ValueError("R and P must hold finite numbers")
        return self


def slug(text: str) -> str:
    """A file-name-safe form of a strategy spec."""
    return re.sub(r"[^A-Za-z0-9_.+=-]+", "_", text.replace(", ", ",")).strip("_")[:120]


def cell_fingerprint(cfg: RunConfig, stream: Stream) -> dict[str, str]:
    """The fingerprint of a cell's record at this schema version (``clsuite.fingerprint``)."""
    return fingerprint(cfg, stream, SCHEMA_VERSION)


def record_path(out: Path, cfg: RunConfig, tag: str = "") -> Path:
    """``out/<stream>/<strategy>/[<tag>/]seed<k>.json`` (``seed<k>.val.json`` for the validation split, so the two
    runs of a cell never share a file); a sweep cell's ``tag`` names its hyper-parameters."""
    base = Path(out) / slug(cfg.stream) / slug(cfg.strategy)
    name = f"seed{cfg.seed}.json" if cfg.eval.split == "test" else f"seed{cfg.seed}.{cfg.eval.split}.json"
    return (base / slug(tag) if tag else base) / name


def new_record(cfg: RunConfig, stream: Stream, tag: str = "", fp: dict[str, str] | None = None) -> dict[str, Any]:
    """The part of a record known before the run: what was run, on what, and its fingerprint."""
    return {
        "schema_version": SCHEMA_VERSION, "status": "complete", "stream": cfg.stream, "strategy": cfg.strategy,
        "seed": cfg.seed, "model": cfg.model, "config": cfg.model_dump(), "split": cfg.eval.split,
        "tasks": [t.name for t in stream.tasks], "probes": [p.name for p in stream.probes],
        "probe_categories": {p.name: p.category for p in stream.probes}, "fingerprint": fp or cell_fingerprint(cfg, stream),
        "scoring": {t.name: t.scoring() for t in stream.tasks + stream.probes},  # scorer, bos, target_delimiter
        **({"tag": tag} if tag else {}),  # a sweep cell's hyper-parameters: its own leaderboard row
    }


def fill_record(record: dict[str, Any], result: dict[str, Any], cost: dict[str, Any]) -> dict[str, Any]:
    """A complete record: the engine's evaluation ``rows`` as matrices R, P (and gold log-likelihoods L), metrics,
    per-experience logs and the run's cost."""
    rows = result["rows"]
    R = [[r["tasks"][t]["score"] for t in record["tasks"]] for r in rows]
    P = [[r["probes"][p]["score"] for p in record["probes"]] for r in rows]
    scored = [p for p in record["probes"] if all("gold_loglik" in r["probes"][p] for r in rows)]
    L = [[r["probes"][p]["gold_loglik"] for p in scored] for r in rows] if scored else None
    return {**record, "R": R, "P": P, "metrics": compute_metrics(R, P, L), "details": [_compact(r) for r in rows],
            "experiences": result["experiences"], "cost": cost}


def _compact(row: dict[str, Any]) -> dict[str, Any]:
    """An evaluation row with its per-item values (``items``, ``item_*`` lists) compact: 0/1 values as a string of
    digits (``"0110"``), other values rounded to 4 decimals."""
    def small(v: Any) -> Any:
        if all(x in (0, 1) and isinstance(x, int) for x in v):
            return "".join(map(str, v))
        return [x if isinstance(x, int) else round(float(x), 4) for x in v]
    return {part: {name: {k: small(v) if k.startswith("item") and isinstance(v, list) else v for k, v in res.items()}
                   for name, res in row[part].items()} for part in row}


def item_scores(record: RunRecord) -> dict[str, list[list[float]]] | None:
    """Per-item scores of each task and probe, row by row (rows x items), from ``details``; None when the record has
    none for some task or probe (made before schema 3, or an lm-eval probe)."""
    details = getattr(record, "details", None) or []
    out: dict[str, list[list[float]]] = {}
    for name, part in [(t, "tasks") for t in record.tasks] + [(p, "probes") for p in record.probes]:
        rows = [d.get(part, {}).get(name, {}).get("items") for d in details]
        if len(rows) != len(record.R) or any(r is None for r in rows):
            return None
        out[name] = [[int(c) for c in r] if isinstance(r, str) else r for r in rows]
    return out


def failed_record(record: dict[str, Any], error: str) -> dict[str, Any]:
    """A failed run's record: the error instead of results."""
    return {**record, "status": "failed", "error": error, "R": [], "P": [], "metrics": {}}


def read_record(path: Path) -> RunRecord:
    """Parse and validate one record; malformed files raise a UserError naming the file."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"record {path} not found: give a run record .json written by 'clsuite run'") from None
    except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, an integer of > 4300 digits, deep nesting
        raise UserError(f"record {path} is not valid JSON ({e}); remove it or re-run that cell") from None
    except OSError as e:  # a directory, no permission
        raise UserError(f"record {path} cannot be read ({e.strerror or e}): give a run record .json file") from None
    return record_from(data, str(path))


def record_from(data: Any, where: str) -> RunRecord:
    """A parsed JSON value as a validated record; anything else is a UserError naming ``where``."""
    if not isinstance(data, dict):
        raise UserError(f"record {where} must be a JSON object, got {type(data).__name__}")
    try:
        return RunRecord.model_validate(data)  # not RunRecord(**data): keys need not be identifiers
    except pydantic.ValidationError as e:
        first = e.errors()[0]
        msg = first["msg"] if first["msg"].isprintable() else repr(first["msg"])
        raise UserError(f"record {where} does not match the run-record schema v{SCHEMA_VERSION}: "
                        f"{error_location(first['loc']) or 'record'}: {msg}") from None


def find_records(paths: list[Path]) -> list[Path]:
    """Record files under the given files or directories (hidden temp files skipped)."""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(q for q in p.rglob("*.json")  # skip hidden temp files, saved models and checkpoints
                          if not any(d.startswith(".") or d.endswith((".model", ".ckpt"))
                                     for d in q.relative_to(p).parts[:-1])
                          and not q.name.startswith("."))
        elif p.exists():
            out.append(p)
        else:
            raise UserError(f"{p} does not exist: give run-record files or directories of them")
    return out


def finite_or_none(x: Any) -> float | None:
    """``x`` as a float when finite, else None (records are strict JSON: no NaN/inf)."""
    if isinstance(x, bool):
        return None
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def run_sharpness(record: RunRecord) -> dict[str, float]:
    """A run's sharpness scalars: means of ``experiences[i]["sharpness"]``, overridden by ``metrics["sharpness_*"]``."""
    prefix = "sharpness_"
    vals: dict[str, list[float]] = {}
    for e in record.experiences:
        sh = e.get("sharpness") if isinstance(e, dict) else None
        for k, v in (sh.items() if isinstance(sh, dict) else ()):
            x = finite_or_none(v)
            if x is not None:
                vals.setdefault(k if k.startswith(prefix) else prefix + k, []).append(x)
    out = {k: sum(v) / len(v) for k, v in vals.items()}
    out.update({k: x for k, v in record.metrics.items() if k.startswith(prefix) and (x := finite_or_none(v)) is not None})
    return out


MIGRATION_NOTE = ("a record migrates only when its fingerprint shows that the data and scoring it was made with are "
                  "those of the stream now")


def migrate_records(paths: list[Path], stream_ref: str | None = None, dry_run: bool = False) -> tuple[list[Path], list[str]]:
    """Bring each older record under ``paths`` to this schema version, written atomically, when its fingerprint
    proves its training rows, evaluation items and scoring equal the stream's as loaded now (test split) and its
    config validates; records without a fingerprint (v1) cannot be checked and are left.
    Returns (migrated files, lines for the records left as they were)."""
    from .streams import for_split, in_order, load_stream  # loads datasets: only here
    streams: dict[str, Stream] = {}
    done, left = [], []
    for f in find_records(paths):
        r = read_record(f)
        if r.schema_version == SCHEMA_VERSION:
            continue
        if r.fingerprint is None:
            left.append(f"{f}: a schema v{r.schema_version} record has no fingerprint, so nothing shows what data it "
                        "was made with: re-run it")
            continue
        ref = stream_ref or r.stream
        if ref not in streams:
            try:
                streams[ref] = for_split(load_stream(ref), "test")
            except UserError as e:
                hint = "" if stream_ref else f"; give the stream of {f} with --stream NAME_OR_YAML"
                raise UserError(f"{e}{hint}") from None
        try:
            cfg = RunConfig.model_validate(r.config)
        except pydantic.ValidationError as e:
            left.append(f"{f}: its config does not validate now ({pydantic_message(e, RunConfig, first_only=True)})")
            continue
        s = in_order(streams[ref], cfg.seed)
        tasks, probes = [t.name for t in s.tasks], [p.name for p in s.probes]
        if (r.stream, r.tasks, r.probes) != (s.name, tasks, probes) or cfg.stream != s.name:
            left.append(f"{f}: made on stream {r.stream!r} with tasks {r.tasks} and probes {r.probes}; stream "
                        f"{s.name!r} ({s.source_file}) has tasks {tasks} and probes {probes}")
            continue
        new = cell_fingerprint(cfg, s)
        odd = [p for p in ("train_data", "eval_data", "scoring") if r.fingerprint.get(p) != new[p]]
        if odd:
            left.append(f"{f}: made with other {describe(odd)}: re-run it")
            continue
        if not dry_run:
            data = json.loads(Path(f).read_text())  # as written: extra keys kept
            write_json(f, {**data, "schema_version": SCHEMA_VERSION, "split": "test", "fingerprint": new})
        done.append(f)
    return done, left
