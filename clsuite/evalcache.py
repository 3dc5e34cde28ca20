"""Row 0 (the model before training) is the same for every strategy and seed of a stream: evaluate it once.

The cache key is a hash of everything row 0 depends on: the weights as loaded (their bytes), the evaluation
settings, and each task's and probe's scorer (with its settings and its bos/target_delimiter conventions), prompt
format and evaluation rows. Entries are
JSON files under ``<out>/<stream>/.initial/`` (hidden, so record discovery skips them), written atomically.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from .errors import UserError
from .atomic import write_json
from .fingerprint import digest, eval_set, scorer_settings
from .records import slug


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of every parameter and buffer (names, dtypes, shapes and bytes), in state-dict order."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy() if t.numel() else b"")
    return h.hexdigest()


def initial_key(model: torch.nn.Module, tok: Any, stream: Any, eval_config: Any, weights: str | None = None) -> str:
    """The hash that identifies row 0 of ``stream`` evaluated on ``model`` and ``tok`` with ``eval_config``
    (``weights``: the model's ``weights_digest`` when already known)."""
    settings = eval_config.model_dump(exclude={"sharpness", "sharpness_examples"})  # not part of row 0
    tokenizer = {"vocab": tok.get_vocab(), "template": getattr(tok, "chat_template", None),
                 "special": tok.special_tokens_map}
    data = {"format": 2,  # 2: rows keep per-item results
            "weights": weights or weights_digest(model), "eval": settings, "chat": stream.chat,
            "tokenizer": digest(tokenizer, 64),
            "tasks": [eval_set(t) for t in stream.tasks], "probes": [eval_set(p) for p in stream.probes],
            "scoring": [scorer_settings(t) for t in stream.tasks + stream.probes]}
    return digest(data, 24)


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
    write_json(path, {"tasks": row["tasks"], "probes": row["probes"]})
