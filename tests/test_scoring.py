"""Scorers against direct computation on a tiny random Llama."""
import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_llama

from clsuite.data import encode_pair
from clsuite.scoring import choice_logliks, score


@pytest.fixture(scope="module")
def model_tok():
    model, tok = tiny_llama(hidden=32, layers=2, heads=4, kv_heads=2)
    return model.eval(), tok


def _naive_loglik(model, tok, prompt, choice):
    p, _ = encode_pair(tok, prompt, "", False, 64, eos=False)
    c = tok(choice, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([p + c])
    with torch.no_grad():
        logp = F.log_softmax(model(ids).logits[0].float(), -1)
    return sum(float(logp[len(p) - 1 + i, t]) for i, t in enumerate(c))


def test_shared_prompt_cache_equals_full_sequences(model_tok):
    model, tok = model_tok
    rows = [{"prompt": "copy abc:", "choices": ["abc", "ab", "abcd"], "answer": 0},
            {"prompt": "len hello world:", "choices": ["11", "3"], "answer": 0},
            {"prompt": "x", "choices": ["a", "bb", "ccc", "dddd"], "answer": 2}]
    got = choice_logliks(model, tok, rows, False, 64, batch_size=2)
    for row, lls in zip(rows, got):
        assert len(lls) == len(row["choices"])
        for c, ll in zip(row["choices"], lls):
            assert ll == pytest.approx(_naive_loglik(model, tok, row["prompt"], c), abs=1e-4)


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


def test_loglik_is_minus_mean_nll(model_tok):
    model, tok = model_tok
    rows = [{"prompt": "copy ab:", "target": "ab"}]
    out = score("loglik", model, tok, rows, False, 64, 1)
    p, t = encode_pair(tok, "copy ab:", "ab", False, 64)
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([p + t])).logits[0].float(), -1)
    nll = -sum(float(logp[len(p) - 1 + i, x]) for i, x in enumerate(t)) / len(t)
    assert out["score"] == pytest.approx(-nll, abs=1e-5)
