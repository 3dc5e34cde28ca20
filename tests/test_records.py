import json

import pytest

from clsuite import records
from clsuite.errors import UserError
from clsuite.records import atomic_write_json, read_record


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    atomic_write_json(path, {"a": 1})

    def boom(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(records.json, "dump", boom)
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
