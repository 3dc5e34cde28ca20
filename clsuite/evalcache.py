"""Row 0 (the model before training) is the same for every strategy and seed of a stream: evaluate it once.

The cache key is a hash of everything row 0 depends on: the weights as loaded (their bytes), the evaluation
settings, and each task's and probe's scorer, prompt format and evaluation rows. Entries are JSON files under
``<out>/<stream>/.initial/`` (hidden, so record discovery skips them), written atomically.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from .errors import UserError
from .records import atomic_write_json, slug


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter and buffer (names, dtypes, shapes and bytes), in state-dict order."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy() if t.numel() else b"")
    return h.hexdigest()


def _eval_set(task: Any) -> dict[str, Any]:
    spec = {"name": task.name, "scorer": task.scorer, "chat": task.chat}
    if getattr(task, "lm_eval", None) is not None:  # lm-eval reads its own data: its settings stand for it
        spec["lm_eval"] = repr(task.lm_eval)
    else:
        spec["rows"] = hashlib.sha256(json.dumps(list(task.eval), sort_keys=True, default=str).encode()).hexdigest()
    return spec


def initial_key(model: torch.nn.Module, tok: Any, stream: Any, eval_config: Any) -> str:
    """The hash that identifies row 0 of ``stream`` evaluated on ``model`` and ``tok`` with ``eval_config``."""
    settings = eval_config.model_dump(exclude={"sharpness", "sharpness_examples"})  # not part of row 0
    tokenizer = {"vocab": tok.get_vocab(), "template": getattr(tok, "chat_template", None),
                 "special": tok.special_tokens_map}
    data = {"weights": weights_digest(model), "eval": settings, "chat": stream.chat,
            "tokenizer": hashlib.sha256(json.dumps(tokenizer, sort_keys=True, default=str).encode()).hexdigest(),
            "tasks": [_eval_set(t) for t in stream.tasks], "probes": [_eval_set(p) for p in stream.probes]}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:24]


def cache_path(out: Path, stream_name: str, key: str) -> Path:
    return Path(out) / slug(stream_name) / ".initial" / f"{key}.json"


def load_initial(path: Path) -> dict[str, Any] | None:
    """The cached row, or None when absent; a damaged entry is an error, never silently recomputed over."""
    if not path.exists():
        return None
    try:
        row = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        row = None
    if not (isinstance(row, dict) and set(row) == {"tasks", "probes"}):
        raise UserError(f"{path} is not a cached evaluation row: delete it and run again")
    return row


def save_initial(path: Path, row: dict[str, Any]) -> None:
    atomic_write_json(path, {"tasks": row["tasks"], "probes": row["probes"]})
