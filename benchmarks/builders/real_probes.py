"""Probes (``eval`` only, multiple choice: ``choices`` + ``answer``) on real text that pip packages ship.

``world_knowledge``  capitals, currencies, US states from word2vec's questions-words.txt (gensim)
``linguistic``       plural, past tense, comparative, opposite, ... from its gram* sections
``mmlu_exemplars``   the MMLU chain-of-thought exemplars shipped in lm-eval, asked zero-shot

``target_prefix`` (default "") is put before every choice: give " " for plain-text (non-chat) scoring.
"""
from __future__ import annotations

import functools
import json
import random
import re
from typing import Any, Sequence

from datasets import Dataset

from clsuite.errors import UserError
from clsuite.streams import data_builder

from .real_text import MC, as_count, data_file, dedupe, read_text, seeded_rng, to_dataset


def _mc(prompt: str, answer: str, pool: Sequence[str], rng: random.Random, k: int = 4,
        prefix: str = "") -> dict:
    """A multiple-choice row: the answer plus ``k - 1`` distinct distractors from ``pool``, shuffled."""
    norm = lambda s: s.strip().lower()  # noqa: E731
    others = sorted({p for p in pool if norm(p) != norm(answer)}, key=norm)
    uniq = list({norm(p): p for p in others}.values())
    choices = rng.sample(uniq, min(k - 1, len(uniq))) + [answer]
    rng.shuffle(choices)
    choices = [prefix + c for c in choices]
    i = choices.index(prefix + answer)
    return {"prompt": prompt, "target": choices[i], "choices": choices, "answer": i}


def _probe(rows: list[dict], name: str, seed: int, n: int | None) -> dict[str, Dataset]:
    rows = dedupe(rows)
    seeded_rng(name, seed, "order").shuffle(rows)
    if n is not None:
        rows = rows[:as_count(n, f"{name}: n", len(rows))]
    return {"eval": to_dataset(rows, MC)}


def _sections(given: str | Sequence[str] | None, known: Sequence[str], default: Sequence[str],
              name: str) -> list[str]:
    if given is None:
        return list(default)
    given = [given] if isinstance(given, str) else list(given)
    bad = [s for s in given if s not in known]
    if bad or not given:
        raise UserError(f"{name}: unknown section(s) {bad or given!r}; choose from {', '.join(known)}")
    return given


# --- probes from word2vec's questions-words.txt ------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def analogy_pairs() -> dict[str, tuple[tuple[str, str], ...]]:
    """Section -> distinct (a, b) word pairs of gensim's questions-words.txt, in file order (do not mutate)."""
    path = data_file("gensim", "test", "test_data", "questions-words.txt")
    out: dict[str, list[tuple[str, str]]] = {}
    section = None
    for line in read_text(path).splitlines():
        if line.startswith(":"):
            section = line[1:].strip()
            out.setdefault(section, [])
            continue
        w = line.split()
        if section is None or len(w) != 4:
            continue
        for pair in ((w[0], w[1]), (w[2], w[3])):
            if pair not in out[section]:
                out[section].append(pair)
    return {k: tuple(v) for k, v in out.items()}


# section -> prompt template with {a}; the answer is b. Cloze prompts: the answer completes the sentence.
WORLD_TEMPLATES = {
    "capital-common-countries": "The capital of {b} is",  # pairs are (capital, country): ask for the capital
    "capital-world": "The capital of {b} is",
    "currency": "The currency of {a} is the",
    "city-in-state": "{a} is a city in the US state of",
}
LINGUISTIC_TEMPLATES = {
    "family": "The female counterpart of '{a}' is",
    "gram1-adjective-to-adverb": "The adverb formed from '{a}' is",
    "gram2-opposite": "The opposite of '{a}' is",
    "gram3-comparative": "The comparative form of '{a}' is",
    "gram4-superlative": "The superlative form of '{a}' is",
    "gram5-present-participle": "The present participle of '{a}' is",
    "gram6-nationality-adjective": "The adjective for people or things from {a} is",
    "gram7-past-tense": "Today I am {a}; yesterday I",
    "gram8-plural": "The plural of '{a}' is",
    "gram9-plural-verbs": "I {a} every day, and so she",
}
_CAPITAL_SWAP = {"capital-common-countries", "capital-world"}  # the answer is the pair's first word


def _analogy_probe(name: str, templates: dict[str, str], default: Sequence[str], seed: int,
                   n: int | None, sections: Any, target_prefix: str) -> dict[str, Dataset]:
    chosen = _sections(sections, list(templates), default, name)
    pairs = analogy_pairs()
    rng = seeded_rng(name, seed, "choices")
    rows = []
    for sec in chosen:
        qa = [(b, a) if sec in _CAPITAL_SWAP else (a, b) for a, b in pairs.get(sec, [])]
        pool = sorted({ans for _, ans in qa})
        for q, ans in qa:
            prompt = templates[sec].format(a=q, b=q)
            rows.append(_mc(prompt, ans, pool, rng, prefix=target_prefix))
    return _probe(rows, name, seed, n)


@data_builder("world_knowledge")
def world_knowledge(seed: int, n: int | None = None, sections: Sequence[str] | str | None = None,
                    target_prefix: str = "") -> dict[str, Dataset]:
    """Cloze facts (capital, currency, US state) with 3 distractors from the same section."""
    return _analogy_probe("world_knowledge", WORLD_TEMPLATES, list(WORLD_TEMPLATES), seed, n, sections,
                          target_prefix)


@data_builder("linguistic")
def linguistic(seed: int, n: int | None = None, sections: Sequence[str] | str | None = None,
               target_prefix: str = "") -> dict[str, Dataset]:
    """Word-form cloze items (plural, past tense, comparative, opposite, ...) with same-section distractors."""
    default = [s for s in LINGUISTIC_TEMPLATES if s.startswith("gram")]
    return _analogy_probe("linguistic", LINGUISTIC_TEMPLATES, default, seed, n, sections, target_prefix)


# --- MMLU exemplars ------------------------------------------------------------------------------------------
_LETTERS = "ABCDEFGHIJ"


@functools.lru_cache(maxsize=None)
def mmlu_items() -> tuple[dict, ...]:
    """Questions of lm-eval's MMLU chain-of-thought exemplars: subject, question, options, answer index."""
    path = data_file("lm_eval", "tasks", "mmlu", "flan_cot_fewshot", "_cot_prompts.json")
    items, seen = [], set()
    for subject, text in json.loads(read_text(path)).items():
        for block in text.split("\n\nQ: ")[1:]:
            head, sep, cot = block.partition("\nA: ")
            ans = re.search(r"answer is \(([A-J])\)", cot)
            at = head.find("(A) ")
            if not sep or not ans or at < 1:
                continue
            question = head[:at].strip()
            parts = re.split(r"\s*\(([A-J])\) ", " " + head[at:])
            letters, options = parts[1::2], [o.strip() for o in parts[2::2]]
            if "".join(letters) != _LETTERS[:len(letters)] or len(letters) < 2 or not all(options):
                continue
            idx = _LETTERS.index(ans.group(1))
            key = (" ".join(question.split()), tuple(options))
            if idx < len(options) and len(set(options)) == len(options) and key not in seen:
                seen.add(key)
                items.append({"subject": subject, "question": question, "options": options, "answer": idx})
    return tuple(items)


@data_builder("mmlu_exemplars")
def mmlu_exemplars(seed: int, n: int | None = None, sections: Sequence[str] | str | None = None,
                   choices: str = "text", target_prefix: str = "") -> dict[str, Dataset]:
    """Zero-shot MMLU questions (the ~280 exemplars lm-eval ships); ``choices``: score option "text" or "letter"."""
    if choices not in ("text", "letter"):
        raise UserError(f"mmlu_exemplars: choices must be 'text' or 'letter', got {choices!r}")
    items = mmlu_items()
    subjects = sorted({it["subject"] for it in items})
    chosen = set(_sections(sections, subjects, subjects, "mmlu_exemplars"))
    rows = []
    for it in items:
        if it["subject"] not in chosen:
            continue
        opts = "\n".join(f"{_LETTERS[i]}. {o}" for i, o in enumerate(it["options"]))
        prompt = (f"The following is a multiple choice question about {it['subject'].replace('_', ' ')}.\n\n"
                  f"{it['question']}\n{opts}\nAnswer:")
        ch = it["options"] if choices == "text" else list(_LETTERS[:len(it["options"])])
        ch = [target_prefix + c for c in ch]
        rows.append({"prompt": prompt, "target": ch[it["answer"]], "choices": ch, "answer": it["answer"]})
    return _probe(rows, "mmlu_exemplars", seed, n)
