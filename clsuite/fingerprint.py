"""A run's fingerprint: short hashes of what determines its numbers, so a record is reused only for the very same cell
(docs/fingerprint.md)."""
from __future__ import annotations

import hashlib
import json
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

import pydantic

from .config import RunConfig
from .errors import UserError
from .scoring import CONVENTIONS, SCORERS

if TYPE_CHECKING:
    from .streams import Stream, Task

PARTS = ("schema", "config", "train_data", "eval_data", "scoring")  # what must match; "code" is informational
WHY = {"schema": "the record schema changed", "config": "other settings: the resolved run configuration changed",
       "train_data": "the training rows changed", "eval_data": "the evaluation items changed",
       "scoring": "a scorer or its settings changed"}


class FingerprintMismatch(UserError):
    """A record or checkpoint made for another cell than this one; ``parts`` names what differs."""

    def __init__(self, message: str, parts: list[str]) -> None:
        super().__init__(message)
        self.parts = parts


def canonical(obj: Any) -> bytes:
    """``obj`` as canonical JSON: sorted keys, no spaces, non-JSON values by ``str``."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode()


def digest(obj: Any, n: int = 16) -> str:
    """The first ``n`` hex digits of the SHA-256 of ``obj``'s canonical JSON."""
    return hashlib.sha256(canonical(obj)).hexdigest()[:n]


def rows_digest(rows: Any) -> str | None:
    """SHA-256 (hex) of a split's rows in order, each as canonical JSON; None for no split."""
    if rows is None:
        return None
    return hashlib.sha256(canonical(rows.to_list() if hasattr(rows, "to_list") else list(rows))).hexdigest()


def eval_set(task: Task) -> dict[str, Any]:
    """What a task's or probe's evaluation reads: name, scorer, chat flag and rows (an lm-eval probe: its spec and
    what identifies lm-eval's data)."""
    spec: dict[str, Any] = {"name": task.name, "scorer": task.scorer, "chat": task.chat}
    if getattr(task, "lm_eval", None) is not None:  # lm-eval reads its own data: its settings stand for it
        spec["lm_eval"] = {"spec": task.lm_eval.spec.model_dump(), "data": task.lm_eval.data}
    else:
        spec["rows"] = rows_digest(task.eval)
    return spec


def scorer_settings(task: Task) -> dict[str, Any]:
    """The scorer of a task or probe: its registered name and ``settings``: the scorer's own, and the task's
    conventions with its name when they are not the defaults (so records made before they existed still match)."""
    if getattr(task, "lm_eval", None) is not None:  # scored by lm-eval, whose settings are part of eval_data
        return {"name": "lm_eval", "settings": {}}
    s = SCORERS.get(task.scorer)
    settings = dict(getattr(s, "settings", None) or {})
    conventions = {k: getattr(task, k, v) for k, v in CONVENTIONS.items()}
    if conventions != CONVENTIONS:  # named by task: the scoring part is a set over the tasks' settings
        settings.update(conventions, task=task.name)
    return {"name": getattr(s, "name", task.scorer), "settings": settings}


def config_digest(config: RunConfig | dict[str, Any]) -> str:
    """The config part: the resolved RunConfig without its seed (seeds differ by design); a dict is validated first,
    so settings added to clsuite since it was written compare at their defaults ("invalid" when it fails)."""
    if isinstance(config, dict):
        try:
            config = RunConfig.model_validate(config)
        except pydantic.ValidationError:
            return "invalid"
    return digest(config.model_dump(exclude={"seed"}))


def _code() -> str:
    """Informational only: the installed clsuite version (the git commit is in the record's provenance)."""
    try:
        return digest({"clsuite": version("clsuite")})
    except PackageNotFoundError:
        return digest({"clsuite": None})


def fingerprint(cfg: RunConfig, stream: Stream, schema: int) -> dict[str, str]:
    """The parts (short hashes), ``hash`` (of the PARTS together) and the informational ``code`` of a cell whose
    record has schema version ``schema``."""
    parts = {
        "schema": digest(schema),
        "config": config_digest(cfg),
        "train_data": digest({"tasks": [[t.name, rows_digest(t.train)] for t in stream.tasks],
                              "general": rows_digest(stream.general)}),
        "eval_data": digest([{**eval_set(t), "category": t.category} for t in stream.tasks + stream.probes]),
        "scoring": digest(sorted({canonical(scorer_settings(t)).decode() for t in stream.tasks + stream.probes})),
    }
    return {**parts, "hash": digest(parts), "code": _code()}


def differing(old: dict[str, Any] | None, new: dict[str, Any], config: dict[str, Any] | None = None) -> list[str]:
    """The PARTS in which fingerprint ``old`` differs from ``new``; with ``config`` (the record's own), its config part
    is recomputed from it (see ``config_digest``). No fingerprint at all differs in ``schema``."""
    if not isinstance(old, dict):
        return ["schema"]
    if config is not None:
        old = {**old, "config": config_digest(config)}
    return [p for p in PARTS if old.get(p) != new.get(p)]


def stale_parts(old: dict[str, Any] | None, old_config: dict[str, Any] | None, new: dict[str, Any],
                seed_differs: bool) -> list[str]:
    """The parts in which a stored record's or checkpoint's fingerprint differs from this cell's; a different seed
    (no part of the fingerprint, but of the cell) counts as ``config``."""
    parts = differing(old, new, old_config)
    if seed_differs and "config" not in parts:
        parts = sorted([*parts, "config"], key=PARTS.index)
    return parts


def describe(parts: list[str]) -> str:
    """``eval_data (the evaluation items changed)``, parts joined with ``and``."""
    return " and ".join(f"{p} ({WHY[p]})" for p in parts)
