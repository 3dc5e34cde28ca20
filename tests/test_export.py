"""clsuite export: real tiny runs in each format, checked against the format's own schema, parser or layout."""
import json
import math
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from conftest import tiny_runs

UUID4_JSON = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}\.json$")


@pytest.fixture(scope="module")
def _store(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("export")


@pytest.fixture
def runs(cli, _store) -> Path:
    """Real records of the tiny test stream (naive and ewc, seed 0, 2 steps), made once per module."""
    return tiny_runs(cli, _store, "naive,ewc", "0")


def _record(runs: Path, strategy: str = "naive") -> dict:
    return json.loads((runs / "tiny-test" / strategy / "seed0.json").read_text())


@pytest.fixture(scope="module")
def eee_schema(pytestconfig, tmp_path_factory) -> dict:
    """Every Eval Ever 0.3.0's eval.schema.json, read from its wheel (downloaded once into pytest's cache: the
    package needs Python >= 3.12, so it is not installed)."""
    pytest.importorskip("jsonschema", reason="jsonschema (installed with ray, a test dependency) validates the export")
    cache = getattr(pytestconfig, "cache", None)
    folder = cache.mkdir("every-eval-ever-0.3.0") if cache else tmp_path_factory.mktemp("eee")
    wheels = sorted(folder.glob("every_eval_ever-0.3.0-*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "every-eval-ever==0.3.0", "--no-deps", "-d", str(folder),
               "--python-version", "3.12", "--only-binary=:all:", "--quiet"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            why = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        except (OSError, subprocess.TimeoutExpired) as e:
            why = str(e)
        wheels = sorted(folder.glob("every_eval_ever-0.3.0-*.whl"))
        if not wheels:
            pytest.skip(f"cannot download the every-eval-ever 0.3.0 wheel for its schema (no package registry?): {why}")
    with zipfile.ZipFile(wheels[0]) as z:
        return json.loads(z.read("every_eval_ever/schemas/eval.schema.json"))


def test_every_eval_ever_files_validate_against_its_schema(runs, cli, tmp_path, eee_schema):
    import jsonschema
    code, out, err = cli("export", runs, "--format", "every-eval-ever", "--out", tmp_path / "eee")
    assert code == 0, err
    files = sorted((tmp_path / "eee").rglob("*.json"))
    assert len(files) == 2 and out.count("wrote ") == 2
    validator = jsonschema.Draft7Validator(eee_schema)
    docs = {}
    for f in files:
        doc = json.loads(f.read_text())
        errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(doc)]
        assert not errors, f"{f}: {errors[:3]}"
        assert list(validator.iter_errors({**doc, "clsuite": {}}))  # the schema is strict: extra keys are refused
        # the datastore's layout: data/<collection>/<developer>/<model>/<uuid4>.json, as model_info.id files it
        parts = f.relative_to(tmp_path / "eee").parts
        assert parts[:4] == ("data", "clsuite-tiny-test", "clsuite", "tiny-synthetic-base")
        assert UUID4_JSON.match(parts[4])
        assert doc["model_info"]["id"] == "tiny-synthetic-base" and doc["model_info"]["developer"] == "clsuite"
        for res in doc["evaluation_results"]:  # Every Eval Ever's score check: within the declared range
            cfg, score = res["metric_config"], res["score_details"]["score"]
            assert float(cfg["min_score"]) <= score <= float(cfg["max_score"]) and math.isfinite(score)
        docs[doc["model_info"]["additional_details"]["strategy"]] = doc
    assert len({d["evaluation_id"] for d in docs.values()}) == 2

    rec, doc = _record(runs), docs["naive"]
    run = doc["source_metadata"]["additional_details"]  # the continual-learning part: order, R, P
    assert json.loads(run["task_order"]) == rec["tasks"] == ["addition", "reversal"]
    assert json.loads(run["R"]) == rec["R"] and json.loads(run["P"]) == rec["P"]
    by_id = {res["evaluation_result_id"]: res for res in doc["evaluation_results"]}
    assert by_id["metric.bwt"]["score_details"]["score"] == rec["metrics"]["bwt"]
    assert by_id["metric.bwt"]["metric_config"]["lower_is_better"] is False
    assert by_id["metric.forgetting"]["metric_config"]["lower_is_better"] is True
    assert by_id["metric.acc"]["metric_config"]["max_score"] == 1
    assert "metric.probe_loglik_retention" not in by_id  # no number in the record: no result
    addition = by_id["task.addition"]
    assert addition["score_details"]["score"] == rec["R"][-1][0]
    assert json.loads(addition["score_details"]["details"]["scores_after_each_experience"]) == [r[0] for r in rec["R"]]
    assert addition["score_details"]["uncertainty"]["num_samples"] == 10
    assert by_id["probe.max"]["metric_config"]["min_score"] == "-Infinity"  # loglik: unbounded

    cli("export", runs, "--format", "every-eval-ever", "--out", tmp_path / "again")  # the same run, the same file
    assert [f.name for f in files] == sorted(f.name for f in (tmp_path / "again").rglob("*.json"))


def test_eval_results_are_hub_entries(runs, cli, tmp_path):
    from huggingface_hub import parse_eval_result_entries
    code, _, err = cli("export", runs, "--format", "eval-results", "--out", tmp_path, "--hf-dataset", "org/cl-bench")
    assert code == 0, err
    path = tmp_path / "tiny-test" / "naive" / "seed0" / ".eval_results" / "tiny-test.yaml"  # a model repo's folder
    assert sorted(tmp_path.rglob("*.yaml")) == [tmp_path / "tiny-test" / "ewc" / "seed0" / ".eval_results" /
                                                "tiny-test.yaml", path]
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, list) and data
    for entry in data:  # the .eval_results keys only (https://huggingface.co/docs/hub/eval-results)
        assert set(entry) <= {"dataset", "value", "verifyToken", "date", "source", "notes"}
        assert set(entry["dataset"]) <= {"id", "task_id", "revision"} and entry["dataset"]["id"] == "org/cl-bench"
        assert isinstance(entry["value"], float) and math.isfinite(entry["value"])
    entries = {e.task_id: e for e in parse_eval_result_entries(data)}  # huggingface_hub's own parser
    rec = _record(runs)
    assert entries["bwt"].value == rec["metrics"]["bwt"] and entries["forgetting"].value == rec["metrics"]["forgetting"]
    assert entries["task.reversal"].value == rec["R"][-1][1] and entries["probe.copy"].value == rec["P"][-1][0]
    assert "probe_loglik_retention" not in entries
    assert "addition -> reversal" in entries["bwt"].notes and "lower is better" in entries["forgetting"].notes


def test_lm_eval_results_layout(runs, cli, tmp_path):
    from lm_eval.result_schema import EvalResults, _EvalConfig
    code, _, err = cli("export", runs / "tiny-test" / "naive", "--format", "lm-eval", "--out", tmp_path)
    assert code == 0, err
    doc = json.loads((tmp_path / "tiny-test" / "naive" / "seed0" / "results.json").read_text())
    assert set(doc) - set(EvalResults.__annotations__) == {"clsuite"}  # lm-eval's keys, and ours apart
    assert {"results", "configs", "versions", "n-shot", "higher_is_better", "n-samples", "config"} <= set(doc)
    assert set(doc["config"]) <= set(_EvalConfig.__annotations__)
    rec = _record(runs)
    assert list(doc["results"]) == rec["tasks"] + rec["probes"]
    for name, row in doc["results"].items():
        assert row["alias"] == name
        assert all(re.fullmatch(r"[^,]+,[^,]+", k) for k in row if k != "alias")  # 'metric,filter'
    assert doc["results"]["addition"]["exact_match,none"] == rec["R"][-1][0]
    assert doc["results"]["max"]["loglik,none"] == rec["P"][-1][1]
    assert doc["n-samples"]["copy"] == {"original": 10, "effective": 10}
    assert doc["higher_is_better"]["copy"] == {"exact_match": True} and doc["n-shot"]["copy"] == 0
    assert doc["higher_is_better"]["max"] == {"loglik": True, "perplexity": False}
    assert doc["clsuite"]["R"] == rec["R"] and doc["clsuite"]["tasks"] == rec["tasks"]
    assert doc["clsuite"]["metrics"]["bwt"] == rec["metrics"]["bwt"]


def test_lm_eval_probe_keeps_lm_evals_keys(runs, cli, tmp_path):
    rec = _record(runs)  # as the engine records an lm-eval probe: its metrics without ',none', and n_samples
    rec["scoring"]["max"] = {"scorer": "lm_eval"}
    rec["details"][-1]["probes"]["max"] = {"score": 0.4, "acc": 0.4, "acc_norm": 0.35,
                                          "exact_match,strict-match": 0.2, "sample_len": 7, "n_samples": 7.0}
    rec["P"][-1][1] = 0.4
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "seed0.json").write_text(json.dumps(rec))
    code, _, err = cli("export", tmp_path / "in", "--format", "lm-eval", "--out", tmp_path / "out")
    assert code == 0, err
    doc = json.loads((tmp_path / "out" / "tiny-test" / "naive" / "seed0" / "results.json").read_text())
    assert doc["results"]["max"] == {"alias": "max", "acc,none": 0.4, "acc_norm,none": 0.35,
                                     "exact_match,strict-match": 0.2, "sample_len": 7}
    assert doc["n-samples"]["max"] == {"original": 7, "effective": 7} and "max" not in doc["n-shot"]
    assert doc["higher_is_better"]["max"] == {"acc": True, "acc_norm": True, "exact_match": True}
    assert doc["configs"]["max"]["metadata"]["clsuite"]["scorer"] == "lm_eval"


def test_readme_export_command_runs_as_written(runs, cli, tmp_path, monkeypatch):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("\n## Leaderboards\n", 1)[1].split("\n## ", 1)[0]
    lines = [ln for ln in section.splitlines() if ln.startswith("clsuite export ")]
    assert lines
    shutil.copytree(runs, tmp_path / "runs")
    monkeypatch.chdir(tmp_path)
    for line in lines:
        args = shlex.split(line, comments=True)
        code, out, err = cli(*args[1:])
        assert code == 0, (line, err)
        dest = Path(args[args.index("--out") + 1])
        assert out.count("wrote ") == 2 and all(Path(w.removeprefix("wrote ")).is_file() and
                                                 Path(w.removeprefix("wrote ")).is_relative_to(dest)
                                                 for w in out.splitlines())


def test_unknown_format_is_a_one_line_error(runs, cli, tmp_path):
    code, _, err = cli("export", runs, "--format", "lm_eval", "--out", tmp_path / "x")
    assert code == 2 and err == ("error: unknown export format 'lm_eval': did you mean 'lm-eval'? choose one of "
                                 "eval-results, every-eval-ever, lm-eval\n")
    assert not (tmp_path / "x").exists()


def test_failed_runs_are_skipped_and_paths_stay_inside_out(runs, cli, tmp_path):
    rec = _record(runs)
    src = tmp_path / "in"
    src.mkdir()
    (src / "ok.json").write_text(json.dumps(rec))
    (src / "failed.json").write_text(json.dumps({**rec, "seed": 1, "status": "failed", "error": "diverged",
                                                 "R": [], "P": [], "metrics": {}}))
    code, out, err = cli("export", src, "--format", "lm-eval", "--out", tmp_path / "out")
    assert code == 0 and out.count("wrote ") == 1 and err.startswith("skipped: ") and "naive seed 1" in err
    code, _, err = cli("export", src / "failed.json", "--format", "lm-eval", "--out", tmp_path / "out")
    assert code == 2 and err == "error: every record found is a failed run: nothing to export\n"
    code, _, err = cli("export", src / "ok.json", runs, "--format", "lm-eval", "--out", tmp_path / "out")
    assert code == 2 and err.count("\n") == 1 and str(src / "ok.json") in err and "export each run once" in err

    evil = tmp_path / "evil"  # record text is untrusted: it names no path outside --out
    evil.mkdir()
    (evil / "seed0.json").write_text(json.dumps({**rec, "stream": "../../..", "strategy": "/etc/x", "model": "../m"}))
    for fmt in ("eval-results", "every-eval-ever", "lm-eval"):
        code, out, err = cli("export", evil, "--format", fmt, "--out", tmp_path / "dest" / fmt)
        assert code == 0, err
        written = [Path(w.removeprefix("wrote ")).resolve() for w in out.splitlines()]
        assert written and all(w.is_relative_to((tmp_path / "dest" / fmt).resolve()) for w in written)
