import json

import pytest

from clsuite import atomic
from clsuite.errors import UserError
from clsuite.atomic import write_json as atomic_write_json
from clsuite.records import read_record


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    atomic_write_json(path, {"a": 1})

    def boom(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(atomic.json, "dump", boom)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_nan_is_refused(tmp_path):
    with pytest.raises(ValueError):
        atomic_write_json(tmp_path / "x.json", {"a": float("nan")})
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("text, match", [
    ("{", "not valid JSON"), ("[1]", "JSON object"), ("{}", "schema"),
    ('{"schema_version": 99}', "schema"),
])
def test_bad_records(tmp_path, text, match):
    (tmp_path / "r.json").write_text(text)
    with pytest.raises(UserError, match=match):
        read_record(tmp_path / "r.json")


def test_v2_records_need_their_fingerprint_v1_ones_are_read_to_be_migrated(tmp_path):
    from clsuite.fingerprint import PARTS
    from clsuite.records import SCHEMA_VERSION
    rec = {"status": "complete", "stream": "s", "strategy": "naive", "seed": 0, "model": "m", "config": {},
           "tasks": ["a"], "probes": [], "R": [[0.0], [1.0]], "P": [[], []], "metrics": {}}
    assert SCHEMA_VERSION == 2
    for fingerprint in (None, {"config": "x"}):  # none, or without every part
        (tmp_path / "r.json").write_text(json.dumps({**rec, "schema_version": 2, "fingerprint": fingerprint}))
        with pytest.raises(UserError, match="schema v2 record needs its fingerprint, with schema, config"):
            read_record(tmp_path / "r.json")
    (tmp_path / "r.json").write_text(json.dumps({**rec, "schema_version": 2, "fingerprint": dict.fromkeys(PARTS, "0")}))
    assert read_record(tmp_path / "r.json").fingerprint["eval_data"] == "0"
    (tmp_path / "r.json").write_text(json.dumps({**rec, "schema_version": 1}))
    assert read_record(tmp_path / "r.json").fingerprint is None
