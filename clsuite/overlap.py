"""Contamination between a stream's training rows and its probes: shared gold answers and shared word n-grams."""
from __future__ import annotations

import re
from typing import Any, Iterable

from .streams import Stream, Task

_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    """Lower-cased word tokens."""
    return _WORD.findall(text.lower())


def ngrams(tokens: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}


def _gold(row: dict) -> str:
    return row["choices"][row["answer"]] if row.get("choices") else row["target"]


def _probe_rows(p: Task) -> list[dict]:
    return list(p.eval) + (list(p.val) if p.val is not None else [])


def probe_overlap(train_rows: Iterable[dict], probe_rows: list[dict], n: int = 4) -> dict[str, Any]:
    """For one task's training rows and one probe's items: the share of items whose gold answer occurs as a word
    sequence in the training text (``answer``), whose gold answer is a training target (``target``), and that share
    a word ``n``-gram of prompt + answer with the training text (``ngram``), with examples of each."""
    text_grams: set[tuple[str, ...]] = set()
    vocab_grams: dict[int, set[tuple[str, ...]]] = {}
    targets = set()
    rows = list(train_rows)
    for r in rows:
        toks = words(r["prompt"]) + words(r["target"])
        text_grams |= ngrams(toks, n)
        targets.add(" ".join(words(r["target"])))
    hits: dict[str, list[str]] = {"answer": [], "target": [], "ngram": []}
    for item in probe_rows:
        ans = words(_gold(item))
        k = len(ans)
        if k and k not in vocab_grams:
            vocab_grams[k] = {g for r in rows for g in ngrams(words(r["prompt"]) + words(r["target"]), k)}
        label = f"{item['prompt'].strip()[-50:]} → {_gold(item).strip()}"
        if k and tuple(ans) in vocab_grams[k]:
            hits["answer"].append(label)
        if " ".join(ans) in targets:
            hits["target"].append(label)
        if ngrams(words(item["prompt"]) + ans, n) & text_grams:
            hits["ngram"].append(label)
    total = max(1, len(probe_rows))
    return {"items": len(probe_rows), **{k: len(v) / total for k, v in hits.items()},
            "examples": {k: v[:3] for k, v in hits.items()}}


def stream_overlap(stream: Stream, n: int = 4) -> list[dict[str, Any]]:
    """``probe_overlap`` of every (task, probe) pair of the stream, and of its general data with every probe."""
    out = []
    sources = [(t.name, t.train) for t in stream.tasks if t.train is not None]
    if stream.general is not None:
        sources.append(("general data", stream.general))
    for name, rows in sources:
        for p in stream.probes:
            if p.lm_eval is None:
                out.append({"task": name, "probe": p.name, **probe_overlap(rows, _probe_rows(p), n)})
    return out
