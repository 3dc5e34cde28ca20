"""clsuite sweep: grid validation and expansion, the local backend (in-process, process pool), Ray, resuming."""
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import yaml

from clsuite.records import find_records

EXAMPLE = Path(__file__).parent.parent / "examples" / "sweep-tiny.yaml"
HAS_RAY = importlib.util.find_spec("ray") is not None


def write_grid(path: Path, doc) -> Path:
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    return path


def tiny_grid(stream: str, **kw) -> dict:
    return {"streams": [stream], "strategies": ["naive"], "seeds": [0], "set": {"steps": [2]}, **kw}


def records(out: Path) -> dict[str, dict]:
    """Record files under ``out`` by relative path (as the leaderboard finds them: not the hidden row-0 cache)."""
    return {str(p.relative_to(out)): json.loads(p.read_text()) for p in sorted(find_records([out]))}


def numbers(recs: dict[str, dict]) -> dict[str, tuple]:
    return {k: (r["status"], r.get("tag"), r["R"], r["P"], r["metrics"]) for k, r in recs.items()}


@pytest.mark.parametrize("change, match", [
    ({"lrr": 1}, "unknown key 'lrr': the keys are streams, strategies, runs, seeds, model, set, eval, selection"),
    ({"seeds": None}, "'seeds' is missing: add it as a list"),
    ({"seeds": ["a"]}, "seeds.0: Input should be a valid integer"),
    ({"seeds": []}, "seeds: List should have at least 1 item"),
    ({"set": {"lr": 1e-4}}, "set.lr: give a list of values to sweep, e.g. lr: [0.0001]"),
    ({"set": {"lrr": [1e-4]}}, "unknown setting 'lrr': did you mean 'lr'?"),
    ({"eval": {"sharpnes": "cheap"}}, "unknown setting 'sharpnes': did you mean 'sharpness'?"),
    ({"set": {"lr": [-1.0]}}, "lr: Input should be greater than 0"),
    ({"strategies": ["sam(rho=)"]}, "expected a value"),
    ({"seeds": [0, 0]}, "are the same run"),
    ({"strategies": ["sam", "sam(rho=0.05)"]}, "are the same run"),  # the same spec once canonical
    ({"streams": ["nowhere.yaml"]}, "not found"),
    ("streams: [", "is not valid YAML"),
    ("- a\n- b\n", "must hold a mapping"),
])
def test_grid_errors_exit_2_on_one_line(cli, tmp_path, tiny_stream_path, change, match):
    doc = change if isinstance(change, str) else {k: v for k, v in {**tiny_grid(tiny_stream_path), **change}.items()
                                                  if v is not None}
    code, _, err = cli("sweep", write_grid(tmp_path / "g.yaml", doc), "--out", tmp_path / "runs")
    assert code == 2, err
    assert err.startswith("error: ") and match in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("args, match", [
    (["--backend", "spark"], "--backend 'spark': choose local or ray"),
    (["--address", "auto"], "--address is for --backend ray"),
    (["--gpus-per-run", "1"], "--gpus-per-run is for --backend ray"),
    (["--workers", "0"], "--workers 0: give at least 1"),
    (["--backend", "ray", "--address", "auto", "--workers", "2"], "drop --workers"),
    ([], "grid"),  # the grid file itself is missing
])
def test_option_errors_exit_2(cli, tmp_path, args, match):
    code, _, err = cli("sweep", tmp_path / "missing.yaml", *args)
    assert code == 2 and match in err and len(err.strip().splitlines()) == 1, err


def test_missing_ray_names_the_install_command(cli, tmp_path, tiny_stream_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    code, _, err = cli("sweep", write_grid(tmp_path / "g.yaml", tiny_grid(tiny_stream_path)), "--backend", "ray")
    assert code == 2 and "pip install 'clsuite[ray]'" in err, err


def test_expansion_tags_and_record_paths(tmp_path, tiny_stream_path):
    from clsuite.records import record_path
    from clsuite.sweep import expand, load_grid
    rel = os.path.relpath(tiny_stream_path, tmp_path)  # stream paths are relative to the grid file
    doc = tiny_grid(rel, strategies=["naive", "ewc"], seeds=[0, 1], set={"lr": [1.0e-3, "2e-3"], "steps": [1]},
                    eval={"sharpness": "cheap"})
    cells = expand(load_grid(write_grid(tmp_path / "g.yaml", doc)), tmp_path / "g.yaml", tmp_path / "runs")
    assert len(cells) == 2 * 2 * 2 and len({c.path for c in cells}) == 8
    assert {c.tag for c in cells} == {"lr=0.001,steps=1", "lr=0.002,steps=1"}  # validated values, sorted keys
    c = cells[0]
    assert (c.config.strategy, c.config.seed, c.config.train.lr, c.config.eval.sharpness) == ("naive", 0, 1e-3, "cheap")
    assert c.path == tmp_path / "runs" / "tiny-test" / "naive" / "lr=0.001_steps=1" / "seed0.json"
    assert c.label == "tiny-test | naive [lr=0.001,steps=1] | seed 0"
    # without set: no tag, the same path as 'clsuite run'
    plain = expand(load_grid(write_grid(tmp_path / "p.yaml", tiny_grid(tiny_stream_path, set={}))),
                   tmp_path / "p.yaml", tmp_path / "runs")
    assert [(c.tag, c.path) for c in plain] == [("", record_path(tmp_path / "runs", plain[0].config))]
    assert plain[0].path == tmp_path / "runs" / "tiny-test" / "naive" / "seed0.json"


def test_dry_run_of_the_example_runs_nothing(cli, tmp_path):
    readme = (EXAMPLE.parent.parent / "README.md").read_text()
    assert f"```yaml\n{EXAMPLE.read_text()}```" in readme  # the README shows the example as it is
    code, out, err = cli("sweep", EXAMPLE, "--dry-run", "--out", tmp_path / "runs")
    assert code == 0, err
    assert out.strip().endswith("8 cells")
    assert "tiny-synthetic | sam [lr=0.002,steps=50] | seed 1  ->  " in out
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_failed_cells_do_not_stop_the_sweep_and_a_restart_skips_recorded_ones(cli, tmp_path, tiny_stream_path):
    doc = tiny_grid(tiny_stream_path, strategies=["naive", "sam(rho=1e30)"])
    grid, out, lb = write_grid(tmp_path / "g.yaml", doc), tmp_path / "runs", tmp_path / "lb"
    code, stdout, err = cli("sweep", grid, "--out", out, "--leaderboard", lb, "--quiet")
    assert code == 1, err
    assert "sweep: 2 cells: 1 ran, 0 skipped, 1 failed" in stdout
    assert "run failed (tiny-test | sam(rho=1e+30) [steps=2] | seed 0): non-finite loss" in err
    assert {k: r["status"] for k, r in records(out).items()} == {"tiny-test/naive/steps=2/seed0.json": "complete",
                                                                 "tiny-test/sam_rho=1e+30/steps=2/seed0.json": "failed"}
    md = (lb / "tiny-test" / "leaderboard.md").read_text()
    assert "| naive [steps=2] | 1 " in md and "Failed runs (not ranked): sam(rho=1e+30) [steps=2] seed 0" in md
    done = out / "tiny-test" / "naive" / "steps=2" / "seed0.json"
    stamp = done.stat().st_mtime_ns
    code, stdout, err = cli("sweep", grid, "--out", out, "--quiet")
    assert code == 1 and "sweep: 2 cells: 0 ran, 1 skipped, 1 failed" in stdout, err
    assert done.stat().st_mtime_ns == stamp
    code, stdout, err = cli("sweep", grid, "--out", out, "--quiet", "--force")
    assert code == 1 and "sweep: 2 cells: 1 ran, 0 skipped, 1 failed" in stdout, err
    assert done.stat().st_mtime_ns != stamp


@pytest.fixture(scope="module")
def in_process_sweep(tmp_path_factory, tiny_stream_path):
    """A grid of two learning rates run in-process: (grid, out); the reference for the parallel backends."""
    from clsuite.sweep import expand, load_grid, run_cells
    d = tmp_path_factory.mktemp("sweep")
    grid = write_grid(d / "g.yaml", tiny_grid(tiny_stream_path, set={"lr": [1.0e-3, 2.0e-3], "steps": [2]}))
    outcomes = run_cells(expand(load_grid(grid), grid, d / "runs"), progress=False)
    assert [o.status for o in outcomes] == ["ran", "ran"]
    return grid, d / "runs"


def test_hyper_parameter_cells_get_their_own_records_and_leaderboard_rows(cli, tmp_path, in_process_sweep):
    _, out = in_process_sweep
    recs = records(out)
    assert {k: (r["tag"], r["config"]["train"]["lr"]) for k, r in recs.items()} == {
        "tiny-test/naive/lr=0.001_steps=2/seed0.json": ("lr=0.001,steps=2", 1e-3),
        "tiny-test/naive/lr=0.002_steps=2/seed0.json": ("lr=0.002,steps=2", 2e-3)}
    code, stdout, err = cli("leaderboard", out, "--out", tmp_path / "lb")
    assert code == 0, err
    assert "| naive [lr=0.001,steps=2] | 1 " in stdout and "| naive [lr=0.002,steps=2] | 1 " in stdout


@pytest.mark.slow
def test_process_pool_gives_the_in_process_numbers(cli, tmp_path, in_process_sweep):
    grid, expected = in_process_sweep
    code, stdout, err = cli("sweep", grid, "--workers", "2", "--out", tmp_path / "runs", "--quiet")
    assert code == 0 and "sweep: 2 cells: 2 ran, 0 skipped, 0 failed" in stdout, err
    assert numbers(records(tmp_path / "runs")) == numbers(records(expected))


@pytest.mark.slow
@pytest.mark.skipif(not HAS_RAY, reason="ray is not installed: pip install 'clsuite[ray]'")
def test_ray_local_cluster_gives_the_in_process_numbers(cli, tmp_path, in_process_sweep):
    grid, expected = in_process_sweep
    code, stdout, err = cli("sweep", grid, "--backend", "ray", "--workers", "2", "--out", tmp_path / "runs", "--quiet")
    assert code == 0 and "sweep: 2 cells: 2 ran, 0 skipped, 0 failed" in stdout, err
    assert numbers(records(tmp_path / "runs")) == numbers(records(expected))
