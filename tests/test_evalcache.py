"""Row 0 is evaluated once per (weights, tokenizer, eval settings, eval data) and reused by later runs."""
from __future__ import annotations

import json

import pytest
import torch

from clsuite import engine
from clsuite.errors import UserError
from clsuite.evalcache import initial_key, load_initial, weights_digest
from clsuite.records import _compact, read_record
from clsuite.streams import for_split
from clsuite.config import resolve_config
from clsuite.runner import run_one
from conftest import tiny_llama


def test_later_runs_reuse_row0_and_get_the_same_record(tiny_stream, tmp_path, monkeypatch):
    calls = []
    real = engine.evaluate
    monkeypatch.setattr(engine, "evaluate", lambda ctx, tasks, progress=False: calls.append(1) or real(ctx, tasks))
    first = read_record(run_one(tiny_stream, resolve_config(tiny_stream, "naive", 0), tmp_path, progress=False))
    assert len(calls) == 2 * 3  # tasks and probes, rows 0..2
    [entry] = (tmp_path / "tiny-test" / ".initial").glob("*.json")
    assert _compact(json.loads(entry.read_text())) == first.details[0]  # the record rounds per-item values
    calls.clear()
    other = read_record(run_one(tiny_stream, resolve_config(tiny_stream, "sam", 1), tmp_path, progress=False))
    assert len(calls) == 2 * 2  # row 0 came from the cache
    assert other.R[0] == first.R[0] and other.P[0] == first.P[0]
    fresh = read_record(run_one(tiny_stream, resolve_config(tiny_stream, "sam", 1), tmp_path / "b", progress=False))
    assert fresh.R == other.R and fresh.P == other.P and fresh.metrics == other.metrics


def test_key_follows_weights_eval_settings_and_data(tiny_stream):
    model, tok = tiny_llama()
    cfg = resolve_config(tiny_stream, "naive", 0)
    key = initial_key(model, tok, tiny_stream, cfg.eval)
    assert key == initial_key(model, tok, tiny_stream, resolve_config(tiny_stream, "sam", 3, eval={"sharpness": "cheap"}).eval)
    assert key != initial_key(model, tok, tiny_stream, resolve_config(tiny_stream, "naive", 0, eval={"max_length": 64}).eval)
    digest = weights_digest(model)
    with torch.no_grad():
        next(model.parameters())[0, 0] += 1e-6
    assert weights_digest(model) != digest and initial_key(model, tok, tiny_stream, cfg.eval) != key
    fewer = type(tiny_stream)(**{**vars(tiny_stream), "probes": tiny_stream.probes[:1]})
    assert initial_key(model, tok, fewer, cfg.eval) != initial_key(model, tok, tiny_stream, cfg.eval)
    val = resolve_config(tiny_stream, "naive", 0, eval={"split": "val"}).eval
    assert initial_key(model, tok, for_split(tiny_stream, "val"), val) != initial_key(model, tok, tiny_stream, cfg.eval)


def test_damaged_entry_is_an_error_not_a_silent_recompute(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="delete it"):
        load_initial(bad)
    assert load_initial(tmp_path / "absent.json") is None
