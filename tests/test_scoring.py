"""Scorers against direct computation on a tiny random Llama; their bos/target_delimiter conventions in streams,
records, fingerprints and the row-0 cache key."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F
import yaml

from conftest import TINY_STREAM, tiny_llama

from clsuite.config import resolve_config
from clsuite.data import encode_pair, prompt_text
from clsuite.errors import UserError
from clsuite.evalcache import initial_key
from clsuite.fingerprint import scorer_settings
from clsuite.records import cell_fingerprint, new_record
from clsuite.scoring import CONVENTIONS, SCORERS, choice_logliks, register_scorer, score
from clsuite.streams import load_stream

CONVENTION_CASES = [(True, ""), (False, " "), (True, "\n"), (False, "")]


@pytest.fixture(scope="module")
def model_tok():
    model, tok = tiny_llama(hidden=32, layers=2, heads=4, kv_heads=2)
    return model.eval(), tok


def _naive_loglik(model, tok, prompt, choice, bos=True, delimiter=""):
    """The previous code's path at the defaults (BOS text before the prompt, the choice tokenized apart), in full."""
    p = tok((tok.bos_token if bos else "") + prompt, add_special_tokens=False)["input_ids"]
    c = tok(delimiter + choice, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p + c])
    with torch.no_grad():
        logp = F.log_softmax(model(ids).logits[0].float(), -1)
    return sum(float(logp[len(p) - 1 + i, t]) for i, t in enumerate(c))


MC_ROWS = [{"prompt": "copy abc:", "choices": ["abc", "ab", "abcd"], "answer": 0},
           {"prompt": "len hello world:", "choices": ["11", "3"], "answer": 0},
           {"prompt": "x", "choices": ["a", "bb", "ccc", "dddd"], "answer": 2}]


@pytest.mark.parametrize("bos, delimiter", CONVENTION_CASES)
def test_shared_prompt_cache_equals_full_sequences(model_tok, bos, delimiter):
    model, tok = model_tok
    got = choice_logliks(model, tok, MC_ROWS, False, 64, batch_size=2, bos=bos, target_delimiter=delimiter)
    for row, lls in zip(MC_ROWS, got):
        assert len(lls) == len(row["choices"])
        for c, ll in zip(row["choices"], lls):
            assert ll == pytest.approx(_naive_loglik(model, tok, row["prompt"], c, bos, delimiter), abs=1e-4)


MANY_ROWS = [{"prompt": "q" * (1 + i % 7), "choices": ["a" * (1 + (i + k) % 4) for k in range(2 + i % 3)], "answer": 0}
             for i in range(11)]  # prompts of 1-7 characters (tokens), 2-4 choices of 1-4 tokens


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_packed_questions_equal_full_sequences(model_tok, batch_size):
    """Several questions share a row of a pass and choices share their prompt under the block mask: each choice's
    log-likelihood is still that of its own prompt + choice run alone."""
    model, tok = model_tok
    got = choice_logliks(model, tok, MANY_ROWS, False, 64, batch_size)
    want = [[_naive_loglik(model, tok, r["prompt"], c) for c in r["choices"]] for r in MANY_ROWS]
    assert [len(s) for s in got] == [len(r["choices"]) for r in MANY_ROWS]
    assert [x for s in got for x in s] == pytest.approx([x for s in want for x in s], abs=1e-4)


def test_packing_without_logits_to_keep_gives_the_same(model_tok):
    """A model whose forward takes no ``logits_to_keep`` has every position projected, then the scored ones read."""
    model, tok = model_tok

    class NoKeep(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids=None, attention_mask=None, position_ids=None, use_cache=None):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=use_cache)

    plain = choice_logliks(NoKeep(model), tok, MANY_ROWS, False, 64, 3)
    assert [x for s in plain for x in s] == pytest.approx(
        [x for s in choice_logliks(model, tok, MANY_ROWS, False, 64, 3) for x in s], abs=1e-5)


@pytest.mark.parametrize("bos", [True, False])
def test_a_shared_prompt_prefix_runs_once(model_tok, bos):
    """Prompts that share 16 tokens or more (an instruction, a chat template's system turn) run that prefix once;
    every question continues from its cache, with the scores of full sequences."""
    model, tok = model_tok
    head = "answer in one word: "  # 20 characters, one token each
    rows = [{"prompt": head + q, "choices": ["ab", "b", "abc"], "answer": 0} for q in ("x", "yy", "zzz", "x y")]
    seen = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].shape), with_kwargs=True)
    try:
        got = choice_logliks(model, tok, rows, False, 64, 2, bos=bos)
    finally:
        hook.remove()
    shared = len(tok((tok.bos_token if bos else "") + head, add_special_tokens=False)["input_ids"])
    assert seen[0] == (1, shared) and all(s[1] < 16 for s in seen[1:])
    want = [[_naive_loglik(model, tok, r["prompt"], c, bos) for c in r["choices"]] for r in rows]
    assert [x for s in got for x in s] == pytest.approx([x for s in want for x in s], abs=1e-4)


@pytest.mark.parametrize("rows", [1, 2, 4])
def test_pack_places_each_question_once_in_rows_no_wider_than_their_pass(rows):
    from clsuite.scoring import _pack
    lengths = [5, 3, 8, 2, 2, 7, 1, 8, 4]
    passes = _pack(lengths, rows)
    placed = [i for p in passes for r in p for i in r]
    assert sorted(placed) == list(range(len(lengths)))
    for p in passes:
        assert 1 <= len(p) <= rows
        width = lengths[p[0][0]]  # the pass's first question is its longest
        assert all(sum(lengths[i] for i in r) <= width for r in p)
    assert sum(len(p) for p in passes) < len(lengths) or rows == 1  # short questions share rows
    assert _pack([], rows) == []


def test_default_conventions_are_the_previous_format(model_tok):
    """Published numbers do not move: the defaults give the old token ids and scores, and the options change them."""
    model, tok = model_tok
    assert CONVENTIONS == {"bos": True, "target_delimiter": ""} and tok.bos_token
    assert encode_pair(tok, "copy ab:", "ab", False, 64) == (
        tok(tok.bos_token + "copy ab:", add_special_tokens=False)["input_ids"],
        tok("ab", add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
    p, t = encode_pair(tok, "copy ab:", "ab", False, 64, bos=False, target_delimiter=" ")
    assert (p, t) == (tok("copy ab:", add_special_tokens=False)["input_ids"],
                      tok(" ab", add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
    old = [[_naive_loglik(model, tok, r["prompt"], c) for c in r["choices"]] for r in MC_ROWS]
    got = choice_logliks(model, tok, MC_ROWS, False, 64, 2)
    assert [x for r in got for x in r] == pytest.approx([x for r in old for x in r], abs=1e-4)
    default = score("multiple_choice", model, tok, MC_ROWS, False, 64, 2)
    assert default == score("multiple_choice", model, tok, MC_ROWS, False, 64, 2, **CONVENTIONS)
    assert default["gold_loglik"] == pytest.approx(sum(s[r["answer"]] for s, r in zip(old, MC_ROWS)) / 3, abs=1e-4)
    other = score("multiple_choice", model, tok, MC_ROWS, False, 64, 2, bos=False, target_delimiter=" ")
    assert other["gold_loglik"] != pytest.approx(default["gold_loglik"], abs=1e-4)


def test_chat_template_bos_is_the_templates():
    from clsuite.benchmarks.models.tiny_synthetic import make_tokenizer
    tok = make_tokenizer()
    tok.chat_template = "{{ bos_token }}{% for m in messages %}U: {{ m['content'] }}{% endfor %} A:"
    assert prompt_text(tok, "hi", True) == tok.bos_token + "U: hi A:"
    assert prompt_text(tok, "hi", True, bos=False) == "U: hi A:"
    tok.chat_template = "{% for m in messages %}U: {{ m['content'] }}{% endfor %}"  # writes no BOS: none is added
    assert prompt_text(tok, "hi", True) == prompt_text(tok, "hi", True, bos=False) == "U: hi"


def test_empty_prompt_without_bos_is_refused(model_tok):
    model, tok = model_tok
    with pytest.raises(UserError, match="empty and bos: false"):
        score("multiple_choice", model, tok, [{"prompt": "", "choices": ["a"], "answer": 0}], False, 64, 1, bos=False)


def test_multiple_choice_accuracy_and_gold(model_tok):
    model, tok = model_tok
    rows = [{"prompt": "q", "choices": ["a", "b"], "answer": 0}, {"prompt": "r", "choices": ["c", "d"], "answer": 1}]
    lls = choice_logliks(model, tok, rows, False, 64, 8)
    out = score("multiple_choice", model, tok, rows, False, 64, 8)
    expect = sum(max(range(2), key=s.__getitem__) == r["answer"] for s, r in zip(lls, rows)) / 2
    assert out["score"] == expect
    assert out["gold_loglik"] == pytest.approx((lls[0][0] + lls[1][1]) / 2)


def test_exact_match_counts_greedy_output(model_tok):
    model, tok = model_tok
    prompt = "copy ab:"
    ids = torch.tensor([encode_pair(tok, prompt, "", False, 64, eos=False)[0]])
    out = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id)
    greedy = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
    rows = [{"prompt": prompt, "target": greedy[:2] or "a"}, {"prompt": prompt, "target": "zzzz"}]
    # the first target is a prefix of the greedy output; it counts only if generation stops there
    res = score("exact_match", model, tok, rows, False, 64, 2)
    assert 0.0 <= res["score"] <= 0.5


def test_hopeless_rows_are_those_that_can_no_longer_match(model_tok):
    from clsuite.scoring import _Hopeless
    _, tok = model_tok
    texts = ["", " 4", " 42", "42  ", "43", "4 2", "42x", "\n"]
    ids = torch.tensor([tok(t, add_special_tokens=False)["input_ids"]
                        + [tok.pad_token_id] * (4 - len(t)) for t in texts])
    stop = _Hopeless(tok, [" 42 "] * len(texts), 0)
    assert stop(ids, None).tolist() == [False, False, False, False, True, True, True, False]


def _greedy_hits(model, tok, rows, budget):
    """Each row generated alone with the full budget and no early stop: the reference exact_match."""
    hits = []
    for r in rows:
        ids = torch.tensor([encode_pair(tok, r["prompt"], "", False, 64, eos=False)[0]])
        out = model.generate(input_ids=ids, max_new_tokens=budget, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)
        hits.append(int(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip() == r["target"].strip()))
    return hits


@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_exact_match_stops_early_with_the_hits_of_full_generation(model_tok, batch_size):
    """Rows stop once hopeless or at EOS, batched by prompt length: the same items as full generation of each row
    alone, in fewer forward passes. EOS is the character the tiny model emits third after "copy ab:", so it can hit."""
    import copy
    model, tok = model_tok
    tok = copy.deepcopy(tok)
    tok.eos_token = "8"
    rows = [{"prompt": "copy ab:", "target": "3i8"}, {"prompt": "x", "target": ",,,"},
            {"prompt": "copy ab:", "target": "3i"}, {"prompt": "len hello:", "target": "3"},
            {"prompt": "len hello:", "target": " 3i8 "},
            {"prompt": "q", "target": "zzzzzzzz"}]
    budget = max(len(tok(r["target"], add_special_tokens=False)["input_ids"]) for r in rows) + 2
    want = _greedy_hits(model, tok, rows, budget)
    calls = []
    hook = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        got = score("exact_match", model, tok, rows, False, 64, batch_size)
    finally:
        hook.remove()
    assert got["items"] == want and sum(want) == 2
    assert len(calls) < len(rows) * budget / batch_size


@pytest.mark.parametrize("bos, delimiter", CONVENTION_CASES)
def test_loglik_is_minus_mean_nll(model_tok, bos, delimiter):
    model, tok = model_tok
    rows = [{"prompt": "copy ab:", "target": "ab"}]
    out = score("loglik", model, tok, rows, False, 64, 1, bos=bos, target_delimiter=delimiter)
    p = tok((tok.bos_token if bos else "") + "copy ab:", add_special_tokens=False)["input_ids"]
    t = tok(delimiter + "ab", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([p + t])).logits[0].float(), -1)
    nll = -sum(float(logp[len(p) - 1 + i, x]) for i, x in enumerate(t)) / len(t)
    assert out["score"] == pytest.approx(-nll, abs=1e-5)


def test_exact_match_prompt_follows_bos(model_tok, monkeypatch):
    model, tok = model_tok
    seen = []
    real = model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: seen.append(kw["input_ids"][0].tolist()) or real(**kw))
    for bos in (True, False):
        score("exact_match", model, tok, [{"prompt": "copy ab:", "target": "ab"}], False, 64, 1, bos=bos,
              target_delimiter=" ")
    assert seen == [tok(tok.bos_token + "copy ab:", add_special_tokens=False)["input_ids"],
                    tok("copy ab:", add_special_tokens=False)["input_ids"]]


# --- the conventions in stream files, records, fingerprints and the row-0 cache -----------------------------------
def _stream(tmp_path, **doc):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"include": TINY_STREAM, "name": "tiny-test", **doc}))
    return load_stream(str(path))


COPY = {"name": "copy", "category": "general", "scorer": "exact_match",
        "source": {"builder": "tiny_general", "skill": "copy", "n_eval": 10}}
MAX = {"name": "max", "category": "general", "scorer": "loglik",
       "source": {"builder": "tiny_general", "skill": "max", "n_eval": 10}}


def test_stream_default_and_per_probe_keys(tmp_path, tiny_stream):
    assert [t.conventions() for t in tiny_stream.tasks + tiny_stream.probes] == [CONVENTIONS] * 4
    s = _stream(tmp_path, bos=False, probes=[{**COPY, "target_delimiter": " "}, {**MAX, "bos": True}])
    assert [t.conventions() for t in s.tasks] == [{"bos": False, "target_delimiter": ""}] * 2
    assert [p.conventions() for p in s.probes] == [{"bos": False, "target_delimiter": " "},
                                                   {"bos": True, "target_delimiter": ""}]
    record = new_record(resolve_config(s, "naive", 0), s)
    assert record["scoring"] == {
        "addition": {"scorer": "exact_match", "bos": False, "target_delimiter": ""},
        "reversal": {"scorer": "exact_match", "bos": False, "target_delimiter": ""},
        "copy": {"scorer": "exact_match", "bos": False, "target_delimiter": " "},
        "max": {"scorer": "loglik", "bos": True, "target_delimiter": ""}}
    assert new_record(resolve_config(tiny_stream, "naive", 0), tiny_stream)["scoring"]["max"] == {
        "scorer": "loglik", **CONVENTIONS}


@pytest.mark.parametrize("doc, match", [
    ({"bos": "no"}, r"stream s\.yaml: bos: Input should be a valid boolean"),
    ({"probes": [{**COPY, "target_delimiter": 1}]},
     r"probe 1 \(copy\): target_delimiter: Input should be a valid string"),
    ({"probes": [{**COPY, "target_delimeter": " "}]},
     r"target_delimeter: unknown key.*did you mean 'target_delimiter'"),
    ({"probes": [{"name": "p", "bos": False, "lm_eval": {"task": "tiny_mc"}}]}, r"probe 1 \(p\): bos: unknown key"),
])
def test_convention_keys_are_strict(tmp_path, doc, match):
    with pytest.raises(UserError, match=match) as e:
        _stream(tmp_path, **doc)
    assert "\n" not in str(e.value)


def test_a_scorer_without_the_keywords_refuses_other_conventions(tmp_path, model_tok):
    @register_scorer("_test_plain")
    def plain(model, tok, examples, chat, max_length, batch_size):
        return {"score": 1.0}
    try:
        assert not plain.takes_conventions and SCORERS.get("multiple_choice").takes_conventions
        probe = {**MAX, "scorer": "_test_plain"}
        assert _stream(tmp_path, probes=[probe]).probes[0].conventions() == CONVENTIONS  # defaults: fine
        with pytest.raises(UserError, match=r"probe 1 \(max\): scorer '_test_plain' does not take bos:"):
            _stream(tmp_path, target_delimiter=" ", probes=[probe])
        model, tok = model_tok
        assert score("_test_plain", model, tok, [], False, 8, 1) == {"score": 1.0}
        with pytest.raises(UserError, match="does not take"):
            score("_test_plain", model, tok, [], False, 8, 1, bos=False)
    finally:
        SCORERS._items.pop("_test_plain")


def test_conventions_enter_the_scoring_fingerprint_and_the_cache_key(tiny_stream):
    cfg = resolve_config(tiny_stream, "naive", 0)
    fp = cell_fingerprint(cfg, tiny_stream)
    max_probe = tiny_stream.probes[1]
    assert scorer_settings(max_probe) == {"name": "loglik", "settings": {}}  # as before: old records still match
    model, tok = tiny_llama()
    key = initial_key(model, tok, tiny_stream, cfg.eval)
    seen = set()
    for change in ({"bos": False}, {"target_delimiter": " "}):
        s = dataclasses.replace(tiny_stream, probes=[tiny_stream.probes[0], dataclasses.replace(max_probe, **change)])
        other = cell_fingerprint(cfg, s)
        assert [p for p in fp if fp[p] != other[p]] == ["scoring", "hash"]
        assert scorer_settings(s.probes[1])["settings"] == {"task": "max", **CONVENTIONS, **change}
        k = initial_key(model, tok, s, cfg.eval)
        assert k != key and k not in seen
        seen.add(k)
    # the same conventions on another task of the same scorer: a different cell
    swapped = dataclasses.replace(tiny_stream, tasks=[dataclasses.replace(tiny_stream.tasks[0], bos=False),
                                                      tiny_stream.tasks[1]])
    swapped2 = dataclasses.replace(tiny_stream, tasks=[tiny_stream.tasks[0],
                                                       dataclasses.replace(tiny_stream.tasks[1], bos=False)])
    assert cell_fingerprint(cfg, swapped)["scoring"] != cell_fingerprint(cfg, swapped2)["scoring"]


@pytest.mark.parametrize("bos, delimiter", [(True, ""), (False, " ")])
def test_a_task_trains_in_the_format_it_is_scored_in(model_tok, tiny_stream, bos, delimiter):
    """The engine's training batches (Context.collate) use the task's bos and target_delimiter, as its scorer does."""
    import dataclasses
    import random

    from clsuite.config import resolve_config
    from clsuite.data import collate
    from clsuite.engine import Context
    model, tok = model_tok
    task = dataclasses.replace(tiny_stream.tasks[0], bos=bos, target_delimiter=delimiter)
    ctx = Context(model, tok, tiny_stream, resolve_config(tiny_stream, "naive", 0), [], random.Random(0), task=task)
    rows = [dict(task.train[i]) for i in range(2)]
    got = ctx.collate(rows)
    want = collate(tok, rows, task.chat, ctx.config.train.max_length, bos=bos, target_delimiter=delimiter)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert (got["input_ids"][:, 0] == tok.bos_token_id).all() == bos
