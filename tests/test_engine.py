"""The engine end to end on the tiny test stream: matrix shapes, determinism, records."""
import json

import pytest

from clsuite.records import read_record
from clsuite.config import resolve_config
from clsuite.runner import run_one


@pytest.fixture(scope="module")
def naive_record(tiny_stream, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    return read_record(run_one(tiny_stream, resolve_config(tiny_stream, "naive", 0), out, progress=False))


def test_record_is_complete(naive_record):
    r = naive_record
    assert r.status == "complete" and r.schema_version == 3 and r.fingerprint
    assert len(r.R) == 3 and all(len(row) == 2 for row in r.R)
    assert len(r.P) == 3 and all(len(row) == 2 for row in r.P)
    assert set(r.metrics) >= {"acc", "bwt", "fwt", "forgetting", "plasticity", "probe_retention", "probe_fg"}
    assert r.cost["compute_multiplier"] == 1.0
    assert r.provenance["versions"]["torch"] and "hardware" in r.provenance
    from clsuite.evalcache import weights_digest
    from clsuite.models import load_model
    assert r.provenance["base_weights"] == weights_digest(load_model(r.model)[0])  # what it started from
    assert [e["task"] for e in r.experiences] == ["addition", "reversal"]
    assert all(e["tokens"] > 0 and e["train_seconds"] > 0 for e in r.experiences)
    assert r.config["train"]["steps"] == 3


def test_same_seed_same_numbers(tiny_stream, tmp_path, naive_record):
    again = read_record(run_one(tiny_stream, resolve_config(tiny_stream, "naive", 0), tmp_path, progress=False))
    assert again.R == naive_record.R and again.P == naive_record.P
    assert [e["loss_curve"] for e in again.experiences] == [e["loss_curve"] for e in naive_record.experiences]


def test_existing_record_is_skipped_not_rewritten(tiny_stream, tmp_path):
    cfg = resolve_config(tiny_stream, "naive", 1)
    path = run_one(tiny_stream, cfg, tmp_path, progress=False)
    before = path.stat().st_mtime_ns
    assert run_one(tiny_stream, cfg, tmp_path, progress=False) == path
    assert path.stat().st_mtime_ns == before


def test_other_settings_refuse_to_overwrite(tiny_stream, tmp_path):
    from clsuite.errors import UserError
    run_one(tiny_stream, resolve_config(tiny_stream, "naive", 2), tmp_path, progress=False)
    with pytest.raises(UserError, match="other settings"):
        run_one(tiny_stream, resolve_config(tiny_stream, "naive", 2, train={"lr": 1e-5}), tmp_path, progress=False)


def test_divergence_writes_failed_record(tiny_stream, tmp_path):
    from clsuite.errors import DivergenceError
    cfg = resolve_config(tiny_stream, "naive", 0, train={"lr": 1e30, "max_grad_norm": None, "optimizer": "SGD"})
    with pytest.raises(DivergenceError, match="non-finite loss"):
        run_one(tiny_stream, cfg, tmp_path, progress=False)
    rec = json.loads(next(tmp_path.rglob("seed0.json")).read_text())
    assert rec["status"] == "failed" and "non-finite" in rec["error"]


def test_diverged_weights_found_by_evaluation_write_failed_record(tiny_stream, tmp_path):
    from clsuite.errors import DivergenceError
    cfg = resolve_config(tiny_stream, "naive", 0, train={"lr": 1e30, "steps": 1})  # one step: no NaN loss seen
    with pytest.raises(DivergenceError, match="non-finite score"):
        run_one(tiny_stream, cfg, tmp_path, progress=False)
    rec = json.loads(next(tmp_path.rglob("seed0.json")).read_text())
    assert rec["status"] == "failed" and "diverged" in rec["error"]


def test_bad_training_settings(tiny_stream):
    from clsuite.errors import UserError
    with pytest.raises(UserError, match="lr"):
        resolve_config(tiny_stream, "naive", 0, train={"lr": -1})
    with pytest.raises(UserError, match="grad_accum"):
        resolve_config(tiny_stream, "naive", 0, train={"batch_size": 7, "grad_accum": 2})
    with pytest.raises(UserError, match="learning_rate: unknown key; known: .*lr"):
        resolve_config(tiny_stream, "naive", 0, train={"learning_rate": 1})


def test_sharpness_is_recorded_and_changes_nothing_else(tiny_stream, tmp_path, naive_record):
    cfg = resolve_config(tiny_stream, "naive", 0, eval={"sharpness": "cheap"})
    rec = read_record(run_one(tiny_stream, cfg, tmp_path, progress=False))
    assert rec.R == naive_record.R and rec.P == naive_record.P
    for e in rec.experiences:
        assert set(e["sharpness"]) == {"sharpness_worst", "sharpness_trace"}
        assert e["sharpness"]["sharpness_worst"] is not None
