"""clsuite.landscape: per-experience sharpness, the `landscape` command on a saved model, sharpness-forgetting
correlation across run records."""
from __future__ import annotations

import json
import math
import random
import subprocess
import sys

from conftest import tiny_llama
import pytest
import torch

from clsuite.errors import UserError
from clsuite.reports.correlate import correlate
from clsuite.reports.landscape import compare_landscapes, landscape
from clsuite.sharpness import measure_sharpness

CHEAP = {"sharpness_worst", "sharpness_trace"}
FULL = CHEAP | {"sharpness_top_eig", "sharpness_curvature", "sharpness_avg_gradient", "sharpness_mean_abs_gradient"}


@pytest.fixture(scope="module")
def ctx(tiny_stream):
    from clsuite.engine import Context
    from clsuite.config import resolve_config
    model, tok = tiny_llama()
    return Context(model, tok, tiny_stream, resolve_config(tiny_stream, "naive", 0), [], random.Random(0),
                   experience=0, task=tiny_stream.tasks[0])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    model, tok = tiny_llama()
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("level, train_mode, keys", [("worst", True, {"sharpness_worst"}), ("cheap", True, CHEAP),
                                                     ("full", False, FULL)])
def test_measure_sharpness_leaves_model_as_found(ctx, level, train_mode, keys):
    ctx.model.train(train_mode)
    before = {k: v.clone() for k, v in ctx.model.state_dict().items()}
    rng = torch.get_rng_state()
    out = measure_sharpness(ctx, level, n_examples=8)
    assert set(out) == keys and all(math.isfinite(v) for v in out.values()), out
    assert all(torch.equal(before[k], v) for k, v in ctx.model.state_dict().items())
    assert all(m.training == train_mode for m in ctx.model.modules())
    assert all(p.grad is None for p in ctx.model.parameters())
    assert torch.equal(rng, torch.get_rng_state())
    assert measure_sharpness(ctx, level, n_examples=8) == out  # deterministic


def _record(path, strategy: str, seed: int, metrics: dict, experiences: list | None = None,
            tag: str = "") -> None:
    rec = {"schema_version": 1, "status": "complete", "stream": "s", "strategy": strategy, "seed": seed,
           "model": "m", "config": {}, "tasks": ["a", "b"], "probes": ["p"], "R": [[0, 0], [1, 0], [0.5, 1]],
           "P": [[1], [1], [1]], "metrics": metrics, "experiences": experiences or [],
           **({"tag": tag} if tag else {})}
    path.write_text(json.dumps(rec))


def test_correlate_monotone_relation(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    for i in range(1, 7):
        sharp = {"sharpness_worst": 0.1 * i}
        metrics = {"forgetting": i ** 2 / 10, "bwt": -float(i), "probe_retention": None, "probe_fg": 3.0}
        if i % 2:  # sharpness stored per experience: averaged
            exps = [{"sharpness": {k: v - 0.01}} for k, v in sharp.items()] + [
                {"sharpness": {k: v + 0.01}} for k, v in sharp.items()]
            _record(runs / f"r{i}.json", "naive" if i < 4 else "sam", i, metrics, exps)
        else:
            _record(runs / f"r{i}.json", "naive" if i < 4 else "sam", i, {**metrics, **sharp})
    _record(runs / "nosharp.json", "naive", 9, {"forgetting": 0.0})
    res = correlate([runs], tmp_path / "out")
    assert res["n_runs"] == 6 and res["n_skipped"] == 1
    pairs = {(p["sharpness"], p["metric"]): p for p in res["pairs"]}
    assert set(pairs) == {("sharpness_worst", "forgetting"), ("sharpness_worst", "bwt"),
                          ("sharpness_worst", "probe_fg")}
    f = pairs[("sharpness_worst", "forgetting")]
    assert f["n"] == 6 and f["spearman"] == pytest.approx(1.0) and f["pearson"] < 1.0
    assert f["spearman_p"] == pytest.approx(2 / 720)  # exact: 2 of the 6! pairings reach |ρ| = 1
    assert f["spearman_ci_low"] == pytest.approx(1.0) and f["spearman_ci_high"] == pytest.approx(1.0)
    assert pairs[("sharpness_worst", "bwt")]["spearman"] == pytest.approx(-1.0)
    assert math.isnan(pairs[("sharpness_worst", "probe_fg")]["spearman"])  # constant metric
    for name in ("correlation.csv", "correlation.md", "correlation.png", "runs.csv"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    assert "1.000 [1.000, 1.000]" in (tmp_path / "out" / "correlation.md").read_text()


def test_correlate_within_strategy_separates_the_confound(tmp_path):
    # Across runs sharper means less forgetting (the strategies differ); within each strategy the opposite holds.
    for i, (label, tag, sharp, forget) in enumerate([("naive", "", 1, 5), ("naive", "", 2, 6), ("naive", "", 3, 7),
                                                      ("sam", "", 10, 1), ("sam", "", 11, 2), ("sam", "", 12, 3),
                                                      ("naive", "steps=32", 5, 4)]):
        _record(tmp_path / f"r{i}.json", label, i, {"forgetting": forget, "sharpness_worst": sharp}, tag=tag)
    res = correlate([tmp_path], tmp_path / "out")
    p = next(p for p in res["pairs"] if p["metric"] == "forgetting")
    assert p["n"] == 7 and p["spearman"] < -0.5
    assert p["within_n"] == 6 and p["within_groups"] == 2  # the single steps=32 run has no seed spread
    assert p["within_pearson"] == pytest.approx(1.0) and p["within_spearman"] == pytest.approx(1.0)
    assert p["within_p"] == pytest.approx(2 / 36, abs=0.01)  # 2 of the 3! x 3! within-strategy pairings
    assert "naive [steps=32]" in res["strategies"]
    assert "## Within strategy" in (tmp_path / "out" / "correlation.md").read_text()


def test_correlate_needs_three_runs(tmp_path):
    for i in range(2):
        _record(tmp_path / f"r{i}.json", "naive", i, {"forgetting": 0.1 * i, "sharpness_worst": 0.1 * i})
    with pytest.raises(UserError, match="at least 3 runs with sharpness"):
        correlate([tmp_path], tmp_path / "out")


def test_correlate_command(tmp_path):
    from typer.testing import CliRunner
    from clsuite.cli import app
    for i in range(3):
        _record(tmp_path / f"r{i}.json", "naive", i, {"forgetting": 0.1 * i, "sharpness_trace": float(i)})
    r = CliRunner().invoke(app, ["correlate", str(tmp_path), "--out", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    assert "Spearman" in r.output and (tmp_path / "out" / "correlation.csv").exists()


@pytest.mark.slow
def test_landscape_command_writes_pngs_and_json(checkpoint, tiny_stream_path, tmp_path):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "clsuite.cli", "landscape", "--checkpoint", str(checkpoint),
                        "--stream", tiny_stream_path, "--task", "addition", "--grid", "3", "--n", "8",
                        "--line-steps", "5", "--out", str(out), "--quiet"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    for suffix in ("_contour.png", "_3d.png", "_1d.png"):
        assert (out / f"addition-eval{suffix}").stat().st_size > 0
    doc = json.loads((out / "addition-eval.json").read_text())
    assert doc["n_examples"] == 8 and doc["grid"] == 3 and doc["model_source"] == "checkpoint"
    loss = doc["surface"]["loss"]
    assert len(loss) == 3 and all(len(row) == 3 and all(math.isfinite(x) for x in row) for row in loss)
    assert loss[1][1] == pytest.approx(doc["surface"]["base_loss"])
    assert set(doc["surface_sharpness"]) == {"curvature", "avg_gradient", "mean_abs_gradient"}
    assert set(doc["sharpness"]) == CHEAP and len(doc["line"]["loss"]) == 5

    # side by side with a second surface of the same settings; other settings or other files are refused
    other = {**doc, "model": str(tmp_path / "sam" / "seed0.model"),
             "surface": {**doc["surface"], "loss": [[x + 1 for x in row] for row in loss]}}
    (tmp_path / "other.json").write_text(json.dumps(other))
    (tmp_path / "wide.json").write_text(json.dumps({**other, "span": 2.0}))
    (tmp_path / "r.json").write_text(json.dumps({"schema_version": 1, "status": "complete"}))
    from typer.testing import CliRunner
    from clsuite.cli import app
    r = CliRunner().invoke(app, ["landscape-compare", str(out / "addition-eval.json"), str(tmp_path / "other.json"),
                                 "--out", str(tmp_path / "cmp.png")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "cmp.png").stat().st_size > 0
    with pytest.raises(UserError, match="differs .* in span"):
        compare_landscapes([out / "addition-eval.json", tmp_path / "wide.json"], tmp_path / "x.png")
    with pytest.raises(UserError, match="not a clsuite landscape JSON"):
        compare_landscapes([out / "addition-eval.json", tmp_path / "r.json"], tmp_path / "x.png")
    with pytest.raises(UserError, match="at least two"):
        compare_landscapes([out / "addition-eval.json"], tmp_path / "x.png")


@pytest.mark.parametrize("kwargs, match", [
    (dict(task="additon"), "did you mean 'addition'.*probes: copy, max"),
    (dict(task="copy", split="train"), "no train split"),
    (dict(checkpoint="/nonexistent/ckpt"), "not found"),
    (dict(checkpoint="RECORD"), "run records carry no weights"),
    (dict(checkpoint="CKPT", model="tiny-synthetic-base"), "not both"),
    (dict(grid=2), "at least 3"),
])
def test_landscape_user_errors(kwargs, match, tiny_stream_path, checkpoint, tmp_path):
    record = tmp_path / "seed0.json"
    record.write_text("{}")
    kwargs = {"task": "addition", "checkpoint": checkpoint, **kwargs}
    kwargs["checkpoint"] = {"RECORD": record, "CKPT": checkpoint}.get(kwargs["checkpoint"], kwargs["checkpoint"])
    with pytest.raises(UserError, match=match):
        landscape(tiny_stream_path, out=tmp_path / "out", **kwargs)


@pytest.mark.slow
def test_landscape_cli_error_is_one_line(checkpoint, tiny_stream_path):
    r = subprocess.run([sys.executable, "-m", "clsuite.cli", "landscape", "--checkpoint", str(checkpoint),
                        "--stream", tiny_stream_path, "--task", "nope"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "unknown task 'nope'" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
