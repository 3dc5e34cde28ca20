"""Leaderboards from several sources: directories, files and .zip archives; a run given by two sources is refused
unless --prefer names the one that counts, and each row shows its sources."""
import json
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from conftest import tiny_runs


@pytest.fixture(scope="module")
def _store(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sources")


@pytest.fixture
def runs(cli, _store) -> Path:
    """Real records of the tiny test stream (naive, seeds 0-2, 2 steps), made once per module."""
    return tiny_runs(cli, _store, "naive", "0,1,2")


def _rec(runs: Path, seed: int, **change) -> dict:
    return {**json.loads((runs / "tiny-test" / "naive" / f"seed{seed}.json").read_text()), **change}


def _put(folder: Path, seed: int, rec: dict) -> Path:
    path = folder / "tiny-test" / "naive" / f"seed{seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec))
    return path


def _zip(path: Path, members: dict[str, object]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, content in members.items():
            z.writestr(name, content if isinstance(content, str) else json.dumps(content))
    return path


def _one_line_error(code: int, err: str) -> str:
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_two_dirs_and_a_zip_rank_together_with_a_source_column(runs, cli, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _put(a, 0, _rec(runs, 0))
    _put(b, 1, _rec(runs, 1))
    z = _zip(tmp_path / "results.zip", {"tiny-test/naive/seed2.json": _rec(runs, 2),
                                        "tiny-test/.initial/row0.json": {"not": "a record"},  # skipped as in a folder
                                        "tiny-test/naive/seed2.ckpt/meta.json": {"experience": 0},
                                        "tiny-test/naive/": ""})
    code, _, err = cli("leaderboard", a, b, z, "--out", tmp_path / "lb")
    assert code == 0, err
    md = (tmp_path / "lb" / "tiny-test" / "leaderboard.md").read_text()
    header = next(ln for ln in md.splitlines() if ln.startswith("| rank"))
    assert [c.strip() for c in header.strip("|").split("|")][:4] == ["rank", "strategy", "source", "n"]
    assert f"{a}, {b}, {z}" in md
    csv = pd.read_csv(tmp_path / "lb" / "tiny-test" / "leaderboard.csv")
    assert csv.loc[0, "n"] == 3 and csv.loc[0, "source"] == ", ".join(sorted(map(str, (a, b, z))))
    acc = [_rec(runs, s)["metrics"]["acc"] for s in (0, 1, 2)]
    assert abs(csv.loc[0, "acc"] - sum(acc) / 3) < 1e-12

    code, _, err = cli("leaderboard", z, "--out", tmp_path / "one")  # one source: no source column
    assert code == 0, err
    assert "source" not in (tmp_path / "one" / "tiny-test" / "leaderboard.md").read_text()
    assert "source" not in pd.read_csv(tmp_path / "one" / "tiny-test" / "leaderboard.csv").columns


def test_a_run_in_two_sources_is_refused_naming_both_and_prefer_resolves_it(runs, cli, tmp_path):
    from clsuite.reports.leaderboard import load_records
    a = tmp_path / "a"
    mine = _put(a, 0, _rec(runs, 0))
    _put(a, 1, _rec(runs, 1))
    theirs = _rec(runs, 0)
    theirs["metrics"] = {**theirs["metrics"], "acc": 0.625}  # tells the two copies apart
    z = _zip(tmp_path / "theirs.zip", {"tiny-test/naive/seed0.json": theirs})
    err = _one_line_error(*cli("leaderboard", a, z, "--out", tmp_path / "lb")[::2])
    assert (f"{mine} and {z}:tiny-test/naive/seed0.json are both naive seed 0 on tiny-test, from two sources: "
            f"pass --prefer {a} or --prefer {z}") in err
    assert not (tmp_path / "lb").exists()

    code, _, err = cli("leaderboard", a, z, "--out", tmp_path / "lb", "--prefer", z)
    assert code == 0, err
    csv = pd.read_csv(tmp_path / "lb" / "tiny-test" / "leaderboard.csv")
    assert csv.loc[0, "n"] == 2 and abs(csv.loc[0, "acc"] - (0.625 + _rec(runs, 1)["metrics"]["acc"]) / 2) < 1e-12
    assert csv.loc[0, "source"] == ", ".join(sorted([str(a), str(z)]))
    complete, _ = load_records([a, z], prefer=[f"{a}/"])  # a path as given: a trailing slash names the same source
    assert sorted(r.metrics["acc"] for r in complete) == sorted(_rec(runs, s)["metrics"]["acc"] for s in (0, 1))

    err = _one_line_error(*cli("leaderboard", a, z, "--out", tmp_path / "x", "--prefer", tmp_path / "theirs.zp")[::2])
    assert "did you mean" in err and str(z) in err


def test_a_run_twice_in_one_source_stays_an_error(runs, cli, tmp_path):
    z = _zip(tmp_path / "r.zip", {"a/seed0.json": _rec(runs, 0), "b/seed0.json": _rec(runs, 0)})
    err = _one_line_error(*cli("leaderboard", z, "--out", tmp_path / "lb", "--prefer", z)[::2])
    assert f"{z}:a/seed0.json and {z}:b/seed0.json are both naive seed 0 on tiny-test: give each run once" in err
    a = tmp_path / "dir"
    _put(a, 0, _rec(runs, 0))
    (a / "copy.json").write_text(json.dumps(_rec(runs, 0)))
    err = _one_line_error(*cli("leaderboard", a, "--out", tmp_path / "lb")[::2])
    assert "are both naive seed 0 on tiny-test: give each run once" in err


def test_an_archive_with_other_members_is_a_one_line_error(runs, cli, tmp_path):
    z = _zip(tmp_path / "r.zip", {"tiny-test/naive/seed0.json": _rec(runs, 0), "notes.txt": "hello"})
    err = _one_line_error(*cli("leaderboard", z, "--out", tmp_path / "lb")[::2])
    assert f"{z} holds notes.txt, which is not a run record (.json)" in err
    z = _zip(tmp_path / "s.zip", {"tiny-test/naive/seed0.json": _rec(runs, 0), "bad.json": {"hello": 1}})
    err = _one_line_error(*cli("leaderboard", z, "--out", tmp_path / "lb")[::2])
    assert f"record {z}:bad.json does not match the run-record schema" in err
    z = _zip(tmp_path / "t.zip", {"x.json": "{not json\n"})
    assert f"record {z}:x.json is not valid JSON" in _one_line_error(*cli("leaderboard", z, "--out", tmp_path)[::2])
    fake = tmp_path / "fake.zip"
    fake.write_text("not a zip")
    assert f"{fake} cannot be read as a .zip archive" in _one_line_error(*cli("leaderboard", fake, "--out",
                                                                             tmp_path)[::2])
    assert not (tmp_path / "lb").exists()


def test_site_and_correlate_read_a_zip_as_the_leaderboard_does(runs, cli, tmp_path):
    recs = {s: _rec(runs, s, metrics={**_rec(runs, s)["metrics"], "sharpness_worst": 0.1 * (s + 1)}) for s in (0, 1, 2)}
    z = _zip(tmp_path / "results.zip", {f"tiny-test/naive/seed{s}.json": r for s, r in recs.items()})
    code, _, err = cli("site", z, "--out", tmp_path / "site")
    assert code == 0, err
    copies = [json.loads(p.read_text()) for p in (tmp_path / "site" / "runs").glob("*.json")]
    assert sorted(c["seed"] for c in copies) == [0, 1, 2]
    assert all(c["metrics"] == recs[c["seed"]]["metrics"] for c in copies)  # each copy is its archive member
    code, out, err = cli("correlate", z, "--out", tmp_path / "corr")
    assert code == 0, err
    corr = pd.read_csv(tmp_path / "corr" / "correlation.csv")
    assert set(corr["sharpness"]) == {"sharpness_worst"} and set(corr["n"]) == {3}, corr
    dup = _zip(tmp_path / "dup.zip", {"a/seed0.json": _rec(runs, 0), "b/seed0.json": _rec(runs, 0)})
    err = _one_line_error(*cli("site", dup, "--out", tmp_path / "s2")[::2])
    assert "are both naive seed 0 on tiny-test: give each run once" in err
