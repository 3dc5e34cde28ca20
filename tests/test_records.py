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


def test_records_need_their_fingerprint_v1_ones_are_read_to_be_migrated(tmp_path):
    from clsuite.fingerprint import PARTS
    from clsuite.records import SCHEMA_VERSION
    rec = {"status": "complete", "stream": "s", "strategy": "naive", "seed": 0, "model": "m", "config": {},
           "tasks": ["a"], "probes": [], "R": [[0.0], [1.0]], "P": [[], []], "metrics": {}}
    assert SCHEMA_VERSION == 3
    for version in (2, 3):
        for fingerprint in (None, {"config": "x"}):  # none, or without every part
            (tmp_path / "r.json").write_text(json.dumps({**rec, "schema_version": version, "fingerprint": fingerprint}))
            with pytest.raises(UserError, match=f"schema v{version} record needs its fingerprint, with schema, config"):
                read_record(tmp_path / "r.json")
    full = {**rec, "schema_version": 3, "fingerprint": dict.fromkeys(PARTS, "0")}
    (tmp_path / "r.json").write_text(json.dumps(full))
    r = read_record(tmp_path / "r.json")
    assert r.fingerprint["eval_data"] == "0" and r.split == "test"  # records before schema 3 scored the test rows
    (tmp_path / "r.json").write_text(json.dumps({**full, "split": "val"}))
    assert read_record(tmp_path / "r.json").split == "val"
    (tmp_path / "r.json").write_text(json.dumps({**full, "split": "dev"}))
    with pytest.raises(UserError, match=r"split: Input should be 'test' or 'val'"):
        read_record(tmp_path / "r.json")
    (tmp_path / "r.json").write_text(json.dumps({**rec, "schema_version": 1}))
    assert read_record(tmp_path / "r.json").fingerprint is None


MC_ROWS = [{"q": f"{a}+{b}=", "c": [str(a + b), str(a + b + 1)], "g": i % 2} for i, (a, b) in
           enumerate([(1, 2), (3, 4), (2, 2), (5, 1), (0, 3)])]


def test_a_record_keeps_per_item_results_whose_mean_is_each_score(tmp_path, tiny_stream_path):
    """Each task's and probe's ``items`` (0/1 for exact_match and multiple_choice, per-example mean log-likelihood
    for loglik) are kept per row of R and P, one per evaluation item, and average to its score."""
    from clsuite.config import resolve_config
    from clsuite.records import item_scores
    from clsuite.runner import run_one
    from clsuite.streams import load_stream
    rows = [{**r, "c": r["c"] if r["g"] == 0 else r["c"][::-1]} for r in MC_ROWS]  # the right sum at index g
    (tmp_path / "mc.json").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "s.yaml").write_text(
        f"include: {tiny_stream_path}\nprobes:\n"
        "  - {name: copy, category: general, scorer: exact_match, source: {builder: tiny_general, skill: copy, "
        "n_eval: 10}}\n"
        "  - {name: max, category: general, scorer: loglik, source: {builder: tiny_general, skill: max, n_eval: 10}}\n"
        "  - {name: sums, category: math, scorer: multiple_choice, eval_split: train, prompt: '{q}', choices: c, "
        f"answer: g, source: {{path: json, data_files: '{tmp_path / 'mc.json'}'}}}}\n")
    s = load_stream(str(tmp_path / "s.yaml"))
    r = read_record(run_one(s, resolve_config(s, "naive", 0), tmp_path / "runs", progress=False))
    items = item_scores(r)
    assert list(items) == ["addition", "reversal", "copy", "max", "sums"]
    sizes = {t.name: len(t.eval) for t in s.tasks + s.probes}
    assert sizes == {"addition": 10, "reversal": 10, "copy": 10, "max": 10, "sums": 5}
    for part, matrix, names in (("tasks", r.R, r.tasks), ("probes", r.P, r.probes)):
        for j, name in enumerate(names):
            assert len(items[name]) == len(matrix) == 3 and all(len(row) == sizes[name] for row in items[name])
            for i, row in enumerate(items[name]):
                kept = r.details[i][part][name]
                assert matrix[i][j] == kept["score"] and sum(row) / len(row) == pytest.approx(kept["score"], abs=1e-4)
                if name == "max":  # log-likelihoods: negative, rounded to 4 decimals
                    assert all(x <= 0 and round(x, 4) == x for x in row) and len(set(row)) > 1
                else:
                    assert set(row) <= {0, 1}
                if name == "sums":
                    gold = kept["item_gold_loglik"]
                    assert len(gold) == 5 and sum(gold) / 5 == pytest.approx(kept["gold_loglik"], abs=1e-4)
    assert any(0 < sum(row) < len(row) for rows in items.values() for row in rows)  # not all alike
    old = r.model_copy(update={"details": [{k: {n: {"score": v["score"]} for n, v in d[k].items()} for k in d}
                                           for d in r.details]})
    assert item_scores(old) is None  # a record made before schema 3 has none


def test_a_run_on_the_validation_split_scores_and_records_it(tmp_path, tiny_stream_path):
    from clsuite.config import resolve_config
    from clsuite.records import cell_fingerprint, item_scores
    from clsuite.runner import run_one
    from clsuite.streams import for_split, load_stream
    (tmp_path / "s.yaml").write_text(
        f"include: {tiny_stream_path}\nprobes:\n"
        "  - {name: copy, category: general, scorer: exact_match, val_size: 4, "
        "source: {builder: tiny_general, skill: copy, n_eval: 10}}\n"
        "  - {name: max, category: general, scorer: loglik, source: {builder: tiny_general, skill: max, n_eval: 10}}\n")
    s = load_stream(str(tmp_path / "s.yaml"))
    cfg = resolve_config(s, "naive", 0, eval={"split": "val"})
    r = read_record(run_one(s, cfg, tmp_path / "runs", progress=False))
    assert r.split == "val" and r.config["eval"]["split"] == "val"
    assert r.tasks == ["addition", "reversal"] and r.probes == ["copy"]  # max has no validation rows
    assert {k: len(v[0]) for k, v in item_scores(r).items()} == {"addition": 10, "reversal": 10, "copy": 4}
    assert r.fingerprint == cell_fingerprint(cfg, for_split(s, "val"))
    test = read_record(run_one(s, resolve_config(s, "naive", 0), tmp_path / "test", progress=False))
    assert test.split == "test" and test.probes == ["copy", "max"]
    sizes = {k: len(v[0]) for k, v in item_scores(test).items()}
    assert sizes == {"addition": 10, "reversal": 10, "copy": 6, "max": 10}  # copy: 10 rows less 4 of validation
    assert test.fingerprint["eval_data"] != r.fingerprint["eval_data"]
    assert test.fingerprint["train_data"] == r.fingerprint["train_data"]  # the same training rows either way
