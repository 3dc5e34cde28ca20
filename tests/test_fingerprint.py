"""Fingerprints: a record, a checkpoint or a leaderboard row is reused only for the very same cell."""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import interrupt_after_first

from clsuite import fingerprint as fpmod
from clsuite import records
from clsuite.checkpoint import META
from clsuite.config import resolve_config
from clsuite.errors import UserError
from clsuite.fingerprint import PARTS, FingerprintMismatch
from clsuite.records import cell_fingerprint, read_record, record_path
from clsuite.runner import run_one
from clsuite.scoring import SCORERS
from clsuite.streams import for_split, load_stream

TINY = Path(__file__).parent / "data" / "tiny-test.yaml"
TASKS = """tasks:
  - {name: addition, scorer: exact_match, max_eval: 5,
     source: {builder: tiny_task, skill: addition, n_train: 64, n_eval: 10}}
  - {name: reversal, scorer: exact_match, source: {builder: tiny_task, skill: reversal, n_train: 64, n_eval: 10}}
"""


def changed(a: dict, b: dict) -> list[str]:
    return [p for p in PARTS if a[p] != b[p]]


def with_task(stream, i: int, **change):
    tasks = list(stream.tasks)
    tasks[i] = dataclasses.replace(tasks[i], **change)
    return dataclasses.replace(stream, tasks=tasks)


def test_stable_for_the_same_cell_and_each_change_moves_its_part(tiny_stream, monkeypatch):
    cfg = resolve_config(tiny_stream, "naive", 0)
    fp = cell_fingerprint(cfg, tiny_stream)
    assert set(fp) == {*PARTS, "hash", "code"} and all(re.fullmatch("[0-9a-f]{16}", v) for v in fp.values())
    assert cell_fingerprint(resolve_config(load_stream(str(TINY)), "naive", 0), load_stream(str(TINY))) == fp
    assert cell_fingerprint(resolve_config(tiny_stream, "naive", 7), tiny_stream) == fp  # the seed differs by design
    first = tiny_stream.tasks[0]
    cases = {
        "eval_data": [with_task(tiny_stream, 0, eval=first.eval.select(range(5))),
                      with_task(tiny_stream, 0, category="other"),
                      dataclasses.replace(tiny_stream, probes=tiny_stream.probes[1:])],
        "train_data": [with_task(tiny_stream, 0, train=first.train.select(range(32))),
                       dataclasses.replace(tiny_stream, general=tiny_stream.general.select(range(10)))],
    }
    for part, streams in cases.items():
        for s in streams:
            other = cell_fingerprint(cfg, s)
            assert changed(fp, other) == [part] and other["hash"] != fp["hash"], part
    slower = resolve_config(tiny_stream, "naive", 0, train={"lr": 1e-5})
    assert changed(fp, cell_fingerprint(slower, tiny_stream)) == ["config"]
    assert changed(fp, cell_fingerprint(resolve_config(tiny_stream, "sam", 0), tiny_stream)) == ["config"]
    on_val = resolve_config(tiny_stream, "naive", 0, eval={"split": "val"})
    # other items, and no probes (neither has validation rows): the loglik scorer of probe max goes with them
    assert changed(fp, cell_fingerprint(on_val, for_split(tiny_stream, "val"))) == ["config", "eval_data", "scoring"]
    probes = [dataclasses.replace(p, val=p.eval) for p in tiny_stream.probes]
    with_val = dataclasses.replace(tiny_stream, probes=probes)
    assert changed(fp, cell_fingerprint(on_val, for_split(with_val, "val"))) == ["config", "eval_data"]

    real = SCORERS.get
    monkeypatch.setattr(SCORERS, "get", lambda name: SimpleNamespace(**vars(real(name)), settings={"bos": True}))
    assert changed(fp, cell_fingerprint(cfg, tiny_stream)) == ["scoring"]
    monkeypatch.setattr(SCORERS, "get", real)
    now = records.SCHEMA_VERSION
    monkeypatch.setattr(records, "SCHEMA_VERSION", now + 1)
    assert changed(fp, cell_fingerprint(cfg, tiny_stream)) == ["schema"]
    monkeypatch.setattr(records, "SCHEMA_VERSION", now)
    monkeypatch.setattr(fpmod, "_code", lambda: "another-version")
    code = cell_fingerprint(cfg, tiny_stream)
    assert code["code"] != fp["code"] and code["hash"] == fp["hash"] and not changed(fp, code)  # no part of the match


def test_hashing_the_rows_follows_order_and_values(tiny_stream):
    rows = tiny_stream.tasks[0].eval
    assert fpmod.rows_digest(rows) == fpmod.rows_digest(rows.to_list()) and fpmod.rows_digest(None) is None
    assert fpmod.rows_digest(rows) != fpmod.rows_digest(rows.select(reversed(range(len(rows)))))
    from clsuite import evalcache
    assert evalcache.eval_set is fpmod.eval_set  # the row-0 cache hashes a task's rows the same way


@pytest.fixture(scope="module")
def one_record(tiny_stream, tmp_path_factory) -> Path:
    """A complete record of naive seed 0 on the tiny stream."""
    return run_one(tiny_stream, resolve_config(tiny_stream, "naive", 0), tmp_path_factory.mktemp("one"), progress=False)


def test_a_record_stores_its_fingerprint(tiny_stream, one_record):
    r = read_record(one_record)
    assert r.schema_version == records.SCHEMA_VERSION == 3 and r.split == "test"
    assert r.fingerprint == cell_fingerprint(resolve_config(tiny_stream, "naive", 0), tiny_stream)


def test_a_v1_record_is_neither_reused_nor_replaced_unasked(tiny_stream, one_record, tmp_path):
    cfg = resolve_config(tiny_stream, "naive", 0)
    _copy(one_record, record_path(tmp_path, cfg), schema_version=1, fingerprint=None)
    rec = record_path(tmp_path, cfg)
    stamp = rec.stat().st_mtime_ns
    with pytest.raises(UserError, match=r"before records had fingerprints \(schema v1\), so nothing shows what data "
                                        r"it was made with: re-run it with --force$") as e:
        run_one(tiny_stream, cfg, tmp_path, progress=False)
    assert not isinstance(e.value, FingerprintMismatch)  # a sweep reports it as a failed cell, it does not re-run it
    assert "migrate" not in str(e.value) and rec.stat().st_mtime_ns == stamp


def test_sweep_reruns_a_cell_whose_eval_set_changed_and_run_refuses_it(cli, tmp_path):
    stream = tmp_path / "s.yaml"
    stream.write_text(f"include: {TINY}\n")
    grid = tmp_path / "g.yaml"
    grid.write_text(json.dumps({"streams": [str(stream)], "strategies": ["naive"], "seeds": [0]}))
    out = tmp_path / "runs"
    code, stdout, err = cli("sweep", grid, "--out", out, "--quiet")
    assert code == 0 and "sweep: 1 cells: 1 ran, 0 skipped, 0 failed" in stdout, err
    rec = out / "tiny-test" / "naive" / "seed0.json"
    stamp = rec.stat().st_mtime_ns
    code, stdout, err = cli("sweep", grid, "--out", out, "--quiet")
    assert code == 0 and "1 ran" not in stdout and "1 skipped" in stdout and "stale" not in stdout, err
    assert rec.stat().st_mtime_ns == stamp

    stream.write_text(f"include: {TINY}\n{TASKS}")  # five evaluation items of addition instead of ten
    code, stdout, err = cli("run", "--stream", stream, "--out", out, "--quiet")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"{rec} was made with other eval_data (the evaluation items changed): re-run with --force" in err
    assert rec.stat().st_mtime_ns == stamp

    code, stdout, err = cli("sweep", grid, "--out", out, "--quiet")
    assert code == 0 and "sweep: 1 cells: 1 ran, 0 skipped, 0 failed" in stdout, err
    assert "re-ran 1 stale cell: eval_data changed" in stdout
    s = load_stream(str(stream))
    assert json.loads(rec.read_text())["fingerprint"] == cell_fingerprint(resolve_config(s, "naive", 0), s)
    stamp = rec.stat().st_mtime_ns
    code, stdout, err = cli("run", "--stream", stream, "--out", out, "--quiet")  # the same cell now: skipped
    assert code == 0 and rec.stat().st_mtime_ns == stamp, err


def test_resume_refuses_a_checkpoint_of_another_fingerprint(tiny_stream, tmp_path, monkeypatch):
    cfg = resolve_config(tiny_stream, "naive", 0)
    ckpt = interrupt_after_first(monkeypatch, tiny_stream, cfg, tmp_path)
    other = with_task(tiny_stream, 1, train=tiny_stream.tasks[1].train.select(range(32)))
    with pytest.raises(FingerprintMismatch, match=r"^checkpoint \S+ was made with other train_data \(the training rows "
                                                  r"changed\); delete it, or run with --force") as e:
        run_one(other, cfg, tmp_path, progress=False, resume=True)
    assert e.value.parts == ["train_data"] and "\n" not in str(e.value)
    meta = json.loads((ckpt / META).read_text())
    del meta["fingerprint"]
    (ckpt / META).write_text(json.dumps(meta))
    with pytest.raises(UserError, match="before checkpoints had fingerprints"):
        run_one(tiny_stream, cfg, tmp_path, progress=False, resume=True)


def _copy(src: Path, dest: Path, **change) -> Path:
    rec = {**json.loads(src.read_text()), **change}
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(rec))
    return dest


def test_leaderboard_refuses_mixed_fingerprints_and_older_records(one_record, tmp_path):
    from clsuite.reports.leaderboard import load_records
    base = json.loads(one_record.read_text())
    fp, cfg = base["fingerprint"], base["config"]
    a = _copy(one_record, tmp_path / "ok" / "seed0.json")
    _copy(one_record, tmp_path / "ok" / "seed1.json", seed=1, config={**cfg, "seed": 1})  # seeds differ by design
    _copy(one_record, tmp_path / "ok" / "sam" / "seed0.json", strategy="sam", config={**cfg, "strategy": "sam"})
    assert len(load_records([tmp_path / "ok"])[0]) == 3
    b = _copy(one_record, tmp_path / "eval" / "seed1.json", seed=1, fingerprint={**fp, "eval_data": "0" * 16})
    with pytest.raises(UserError, match=rf"^{re.escape(str(a))} and {re.escape(str(b))} \(stream tiny-test\) were "
                                        r"made with other eval_data \(the evaluation items changed\)"):
        load_records([a, b])
    c = _copy(one_record, tmp_path / "sam" / "seed0.json", strategy="sam", fingerprint={**fp, "scoring": "0" * 16})
    with pytest.raises(UserError, match=r"\(stream tiny-test\) were made with other scoring"):  # rows of one table
        load_records([a, c])
    lr = {**cfg, "seed": 1, "train": {**cfg["train"], "lr": 1e-5}}
    d = _copy(one_record, tmp_path / "lr" / "seed1.json", seed=1, config=lr)
    with pytest.raises(UserError, match=rf"^{re.escape(str(a))} and {re.escape(str(d))} \(naive\) were made with "
                                        r"other config"):
        load_records([a, d])
    v1 = _copy(one_record, tmp_path / "v1" / "seed1.json", seed=1, schema_version=1, fingerprint=None)
    with pytest.raises(UserError, match=rf"^{re.escape(str(v1))} is a schema v1 record \(this clsuite writes v3\): "
                                        rf"run 'clsuite migrate {re.escape(str(v1.parent))}'"):
        load_records([a, v1])
    v2 = _copy(one_record, tmp_path / "v2" / "seed1.json", seed=1, schema_version=2)  # its fingerprint, all the same
    with pytest.raises(UserError, match=rf"^{re.escape(str(v2))} is a schema v2 record \(this clsuite writes v3\): "
                                        r"run 'clsuite migrate .*', which upgrades it if the stream's data is "
                                        r"unchanged, or re-run it$"):
        load_records([a, v2])


def _whole_training_rows(stream):
    """The stream as clsuite trained on it before schema 3: each task's validation rows still in its training rows."""
    from datasets import concatenate_datasets
    return dataclasses.replace(stream, tasks=[dataclasses.replace(t, train=concatenate_datasets([t.train, t.val]))
                                              for t in stream.tasks])


def test_migrate_upgrades_only_v2_records_of_unchanged_data(cli, one_record, tmp_path, tiny_stream, tiny_stream_path):
    old = json.loads(one_record.read_text())
    legacy = {k: v for k, v in old.items() if k != "split"}  # a v2 record had no split: it scored the test rows
    cfg0, cfg1 = (resolve_config(tiny_stream, "naive", seed) for seed in (0, 1))
    assert old["fingerprint"] == fpmod.fingerprint(cfg0, tiny_stream, 3)
    runs = tmp_path / "runs"
    same, moved, v1 = (runs / "tiny-test" / "naive" / f"seed{k}.json" for k in (0, 1, 2))
    same.parent.mkdir(parents=True)
    same.write_text(json.dumps({**legacy, "schema_version": 2, "fingerprint": fpmod.fingerprint(cfg0, tiny_stream, 2)}))
    before = fpmod.fingerprint(cfg1, _whole_training_rows(tiny_stream), 2)  # trained on every training row
    assert changed(before, fpmod.fingerprint(cfg1, tiny_stream, 2)) == ["train_data"]
    moved.write_text(json.dumps({**legacy, "schema_version": 2, "seed": 1, "config": cfg1.model_dump(),
                                 "fingerprint": before}))
    v1.write_text(json.dumps({**{k: v for k, v in legacy.items() if k != "fingerprint"}, "schema_version": 1,
                              "seed": 2, "config": resolve_config(tiny_stream, "naive", 2).model_dump()}))
    texts = {f: f.read_text() for f in (same, moved, v1)}

    code, _, err = cli("leaderboard", runs, "--out", tmp_path / "lb")
    assert code == 2 and "clsuite migrate" in err, err
    code, _, err = cli("migrate", runs)  # tiny-test is no built-in stream: its YAML must be given
    assert code == 2 and "give the stream of" in err and "--stream NAME_OR_YAML" in err, err
    code, stdout, err = cli("migrate", runs, "--stream", tiny_stream_path, "--dry-run")
    assert code == 1 and "would migrate 1 record, left 2" in stdout, (stdout, err)
    assert {f: f.read_text() for f in texts} == texts
    other = tmp_path / "other.yaml"
    other.write_text(f"include: {TINY}\nprobes: []\n")
    code, stdout, err = cli("migrate", runs, "--stream", other)
    assert code == 1 and "migrated 0 records, left 3" in stdout and err.count("has tasks") == 2, (stdout, err)

    code, stdout, err = cli("migrate", runs, "--stream", tiny_stream_path)
    assert code == 1 and "migrated 1 record, left 2" in stdout, (stdout, err)
    assert "a record migrates only when its fingerprint shows" in stdout
    assert f"left: {moved}: made with other train_data (the training rows changed): re-run it" in err.splitlines()
    assert f"left: {v1}: a schema v1 record has no fingerprint, so nothing shows what data it was made with: " \
           "re-run it" in err.splitlines()
    assert json.loads(same.read_text()) == {**legacy, "schema_version": 3, "split": "test",
                                            "fingerprint": old["fingerprint"]}
    assert moved.read_text() == texts[moved] and v1.read_text() == texts[v1]
    code, stdout, err = cli("leaderboard", same, "--out", tmp_path / "lb")
    assert code == 0 and "| naive " in stdout, err
    code, stdout, err = cli("leaderboard", runs, "--out", tmp_path / "lb2")  # the ones left are still refused
    assert code == 2 and "is a schema v" in err, err
    code, stdout, _ = cli("migrate", runs, "--stream", tiny_stream_path)  # nothing more to do
    assert code == 1 and "migrated 0 records, left 2" in stdout
