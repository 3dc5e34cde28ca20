"""Data builders of ``tiny-synthetic``: procedurally generated, seeded skills (the stream runs offline).

The general skills are the tiny model's pre-training mix (``clsuite.benchmarks.models.tiny_synthetic``); their
held-out items are the probes. The task skills are what the stream fine-tunes on, one after another.
"""
from __future__ import annotations

import random
import string
from typing import Callable

from datasets import Dataset

from clsuite.streams import data_builder

LETTERS = "abcdefghij"  # the tasks' alphabet: small, so a tiny model learns them in a few dozen steps
N_PER_SKILL = 4000  # pre-training examples per general skill


def _word(rng: random.Random, lo: int = 2, hi: int = 5, alphabet: str = LETTERS) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))


# --- general skills (pre-training mix; their held-out items are the probes) -----------------------------
def _copy(rng):
    w = _word(rng, 2, 6, string.ascii_lowercase)
    return f"copy {w}:", w


def _succ(rng):
    w = _word(rng, 1, 4, string.ascii_lowercase[:-1])
    return f"next {w}:", "".join(chr(ord(c) + 1) for c in w)


def _maxd(rng):
    ds = [str(rng.randint(0, 9)) for _ in range(rng.randint(2, 5))]
    return f"max {' '.join(ds)}:", max(ds)


def _count(rng):
    w = _word(rng, 1, 9, string.ascii_lowercase)
    return f"len {w}:", str(len(w))


GENERAL: dict[str, Callable] = {"copy": _copy, "next": _succ, "max": _maxd, "count": _count}


# --- the stream's tasks: distinct skills -----------------------------------------------------------------
def _add(rng):
    a, b = rng.randint(0, 49), rng.randint(0, 9)
    return f"{a}+{b}=", str(a + b)


def _rev(rng):
    w = _word(rng, 2, 4)
    return f"rev {w}:", w[::-1]


def _sort(rng):
    w = _word(rng, 2, 4)
    return f"sort {w}:", "".join(sorted(w))


def _recall(rng):
    keys = rng.sample(LETTERS, 2)
    vals = [str(rng.randint(0, 9)) for _ in keys]
    q = rng.randrange(2)
    return ",".join(f"{k}={v}" for k, v in zip(keys, vals)) + f";{keys[q]}?", vals[q]


_CIPHER = dict(zip(LETTERS, "qwertyuiop"))


def _cipher(rng):
    w = _word(rng, 2, 4)
    return f"enc {w}:", "".join(_CIPHER[c] for c in w)


TASKS: dict[str, Callable] = {"addition": _add, "reversal": _rev, "sorting": _sort, "recall": _recall,
                              "cipher": _cipher}


def _unique(gen: Callable, rng: random.Random, n: int, exclude: set[str] = frozenset()) -> list[tuple[str, str]]:
    seen, out = set(exclude), []
    for _ in range(50 * n):
        p, t = gen(rng)
        if p not in seen:
            seen.add(p)
            out.append((p, t))
            if len(out) == n:
                break
    return out


def _rows(pairs: list[tuple[str, str]]) -> Dataset:
    return Dataset.from_dict({"prompt": [p for p, _ in pairs], "target": [t for _, t in pairs]})


@data_builder("tiny_task")
def tiny_task(seed: int, skill: str, n_train: int = 2000, n_eval: int = 100) -> dict[str, Dataset]:
    """Train/eval splits of one task skill (addition, reversal, sorting, recall, cipher), disjoint prompts."""
    rng = random.Random(f"{skill}-{seed}")
    ev = _unique(TASKS[skill], rng, n_eval)
    return {"train": _rows(_unique(TASKS[skill], rng, n_train, {p for p, _ in ev})), "eval": _rows(ev)}


@data_builder("tiny_general")
def tiny_general(seed: int, skill: str, n_eval: int = 100) -> dict[str, Dataset]:
    """Held-out items of a pre-training skill; the pre-training mix never contains them."""
    return {"eval": _rows(general_split(skill, seed)[1][:n_eval])}


def general_split(skill: str, seed: int) -> tuple[list, list]:
    """(pre-training pool, held-out probe items) of a general skill: disjoint (prompt, target) pairs."""
    rng = random.Random(f"general-{skill}-{seed}")
    held = _unique(GENERAL[skill], rng, 200)
    return _unique(GENERAL[skill], rng, N_PER_SKILL, {p for p, _ in held}), held


@data_builder("tiny_general_mix")
def tiny_general_mix(seed: int, n: int = 500) -> dict[str, Dataset]:
    """Pre-training examples (not the probes), for rehearsal of general data."""
    rng = random.Random(f"mix-{seed}")
    pool = [pair for s in GENERAL for pair in general_split(s, 0)[0]]
    return {"train": _rows(rng.sample(pool, n))}
