"""Run records: one schema-versioned JSON file per run, written atomically and validated when read."""
from __future__ import annotations

import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import IO, Any, Callable, Literal

import pydantic
from pydantic import BaseModel, ConfigDict

from .errors import UserError

SCHEMA_VERSION = 1


class RunRecord(BaseModel):
    """The schema every leaderboard input must satisfy (extra keys allowed for forward compatibility)."""
    model_config = ConfigDict(extra="allow")
    schema_version: Literal[1]
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
    wall_seconds: float | None = None

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


def _atomic_write(path: Path, write: Callable[[IO[str]], Any]) -> None:
    """Run ``write`` on a temporary file beside ``path``, sync it, then rename it into place: readers see the old
    file or the whole new one, never a part; a failure leaves the old file and no temporary one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file atomically (see ``_atomic_write``)."""
    _atomic_write(path, lambda f: f.write(text))


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (see ``_atomic_write``); NaN and infinities are refused."""
    _atomic_write(path, lambda f: json.dump(obj, f, indent=1, allow_nan=False))


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
    if not isinstance(data, dict):
        raise UserError(f"record {path} must be a JSON object, got {type(data).__name__}")
    try:
        return RunRecord(**data)
    except pydantic.ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(k) if str(k).isprintable() else repr(k) for k in first["loc"]) or "record"
        raise UserError(f"record {path} does not match the run-record schema v{SCHEMA_VERSION}: "
                        f"{where}: {first['msg']}") from None


def find_records(paths: list[Path]) -> list[Path]:
    """Record files under the given files or directories (hidden temp files skipped)."""
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(q for q in p.rglob("*.json")  # skip hidden temp files and saved models (<run>.model/)
                          if not any(d.startswith(".") or d.endswith(".model") for d in q.relative_to(p).parts[:-1])
                          and not q.name.startswith("."))
        elif p.exists():
            out.append(p)
        else:
            raise UserError(f"{p} does not exist: give run-record files or directories of them")
    return out


def _finite(x: Any) -> float | None:
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
            x = _finite(v)
            if x is not None:
                vals.setdefault(k if k.startswith(prefix) else prefix + k, []).append(x)
    out = {k: sum(v) / len(v) for k, v in vals.items()}
    out.update({k: x for k, v in record.metrics.items() if k.startswith(prefix) and (x := _finite(v)) is not None})
    return out
