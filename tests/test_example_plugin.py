"""The worked third-party examples: pip-installed packages add a strategy, a scorer and a data builder through
their entry-point groups.

The example is installed with ``pip install --target`` into a temporary folder that the CLI subprocesses see
through PYTHONPATH, so the test leaves the shared virtual environment unchanged (entry points are read from
every ``*.dist-info`` on ``sys.path``, so this is the same discovery path as a normal install).
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _install(name: str, tmp_path_factory) -> dict[str, str]:
    """pip-install ``examples/<name>`` into a fresh folder; the environment that puts it on PYTHONPATH."""
    example = EXAMPLES / name
    if subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode != 0:
        pytest.skip(f"pip is not available for {sys.executable}: cannot install the example package")
    target = tmp_path_factory.mktemp("site")
    # build from a copy: an in-tree build would leave build/ and *.egg-info in the example folder
    src = shutil.copytree(example, tmp_path_factory.mktemp("src") / example.name,
                          ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    offline = importlib.util.find_spec("setuptools") is not None  # build with it, no download needed
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--disable-pip-version-check",
           "--target", str(target), *(["--no-build-isolation"] if offline else []), str(src)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        if not offline:
            pytest.skip(f"cannot build the example without setuptools in the environment (and no index?): "
                        f"{r.stderr.strip().splitlines()[-1:]}")
        pytest.fail(f"pip install of {example} failed:\n{r.stderr}")
    assert list(target.glob(f"{name.replace('-', '_')}-*.dist-info"))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(target), *filter(None, [env.get("PYTHONPATH")])])
    return env


@pytest.fixture(scope="session")
def plugin_env(tmp_path_factory) -> dict[str, str]:
    return _install("clsuite-example-strategy", tmp_path_factory)


@pytest.fixture(scope="session")
def scorer_env(tmp_path_factory) -> dict[str, str]:
    return _install("clsuite-example-scorer", tmp_path_factory)


def clsuite(env, *args):
    return subprocess.run([sys.executable, "-m", "clsuite.cli", *args], capture_output=True, text=True, env=env,
                          timeout=600)


@pytest.mark.slow
def test_list_shows_the_plugin(plugin_env):
    r = clsuite(plugin_env, "list", "strategies")
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if x.strip().startswith("l2 "))
    assert "[loss]" in line and "L2 pull" in line
    assert "weight=0.01" in r.stdout


@pytest.mark.slow
def test_run_composes_the_plugin_with_sam(plugin_env, tiny_stream_path, tmp_path):
    r = clsuite(plugin_env, "run", "--stream", tiny_stream_path, "--strategies", "sam+l2(weight=0.1)",
                "--out", str(tmp_path), "--quiet")
    assert r.returncode == 0, r.stderr
    (path,) = tmp_path.rglob("seed0.json")
    rec = json.loads(path.read_text())
    assert rec["status"] == "complete" and rec["strategy"] == "l2(weight=0.1)+sam"
    assert len(rec["R"]) == 3 and all(len(row) == 2 for row in rec["R"])
    assert rec["cost"]["compute_multiplier"] == 2.0
    assert rec["cost"]["extra_memory_bytes"] >= 4 * rec["cost"]["trainable_parameters"]  # the anchor copy
    s = clsuite(plugin_env, "show", str(path))
    assert s.returncode == 0 and "l2(weight=0.1)+sam" in s.stdout


@pytest.mark.slow
def test_bad_plugin_parameter_is_a_user_error(plugin_env, tiny_stream_path, tmp_path):
    r = clsuite(plugin_env, "run", "--stream", tiny_stream_path, "--strategies", "l2(weight=-1)", "--out", str(tmp_path))
    assert r.returncode == 2 and "weight" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_list_shows_the_scorer_and_builder(scorer_env):
    r = clsuite(scorer_env, "list", "scorers")
    assert r.returncode == 0, r.stderr
    assert any(x.split()[:3] == ["token_accuracy", "higher", "is"] for x in r.stdout.splitlines()), r.stdout
    r = clsuite(scorer_env, "list", "builders")
    assert r.returncode == 0, r.stderr
    assert any(x.split()[:2] == ["letter_shift", "Move"] for x in r.stdout.splitlines()), r.stdout


@pytest.mark.slow
def test_stream_uses_the_plugin_scorer_and_builder(scorer_env, tiny_stream_path, tmp_path):
    stream = tmp_path / "shift.yaml"
    stream.write_text(f"""include: {tiny_stream_path}
name: shift-test
tasks:
  - {{name: shift, scorer: token_accuracy, source: {{builder: letter_shift, shift: 2, n_train: 32, n_eval: 10}}}}
  - {{name: addition, scorer: exact_match, source: {{builder: tiny_task, skill: addition, n_train: 32, n_eval: 10}}}}
""")
    r = clsuite(scorer_env, "run", "--stream", str(stream), "--strategies", "naive", "--out", str(tmp_path / "runs"),
                "--quiet")
    assert r.returncode == 0, r.stderr
    (path,) = (tmp_path / "runs").rglob("seed0.json")
    rec = json.loads(path.read_text())
    assert rec["status"] == "complete" and len(rec["R"]) == 3
    assert all(0 <= row[0] <= 1 for row in rec["R"])


@pytest.mark.slow
def test_misspelt_plugin_scorer_is_suggested(scorer_env, tiny_stream_path, tmp_path):
    stream = tmp_path / "typo.yaml"
    stream.write_text(f"""include: {tiny_stream_path}
tasks:
  - {{name: shift, scorer: token_acuracy, source: {{builder: letter_shift}}}}
""")
    r = clsuite(scorer_env, "run", "--stream", str(stream), "--strategies", "naive", "--out", str(tmp_path / "runs"))
    assert r.returncode == 2 and "did you mean 'token_accuracy'" in r.stderr and "Traceback" not in r.stderr
