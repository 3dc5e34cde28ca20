"""Load a causal LM and its tokenizer: a registered name (built or shipped locally), a hub id or a local path."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import os

from .errors import UserError
from .registry import Registry

# name -> fn() -> (model, tokenizer); built-ins register from clsuite.benchmarks modules, plugins through entry points.
MODELS: Registry[Callable[[], tuple[Any, Any]]] = Registry("model", "clsuite.models", builtins="clsuite.benchmarks")


def cache_dir() -> Path:
    """Where clsuite caches built or converted models: $CLSUITE_CACHE, else ~/.cache/clsuite."""
    return Path(os.environ.get("CLSUITE_CACHE", Path.home() / ".cache" / "clsuite"))


def load_model(name: str) -> tuple[Any, Any]:
    """(model, tokenizer) in float32 on the CPU, in train mode; tokenizer with a pad token."""
    if name in MODELS:
        model, tok = MODELS.get(name)()
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        try:
            tok = AutoTokenizer.from_pretrained(name)
            model = AutoModelForCausalLM.from_pretrained(name, dtype="float32")
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load model {name!r}: {str(e).splitlines()[0]} — give a registered model "
                            f"({', '.join(MODELS.names())}), a local directory or a hub id (needs internet)") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    model.train()
    return model, tok
