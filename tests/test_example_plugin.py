"""The worked third-party example: a pip-installed package adds a strategy through the entry-point group.

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

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "clsuite-example-strategy"


@pytest.fixture(scope="session")
def plugin_env(tmp_path_factory) -> dict[str, str]:
    if subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True).returncode != 0:
        pytest.skip(f"pip is not available for {sys.executable}: cannot install the example package")
    target = tmp_path_factory.mktemp("site")
    # build from a copy: an in-tree build would leave build/ and *.egg-info in the example folder
    src = shutil.copytree(EXAMPLE, tmp_path_factory.mktemp("src") / EXAMPLE.name,
                          ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    offline = importlib.util.find_spec("setuptools") is not None  # build with it, no download needed
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--disable-pip-version-check",
           "--target", str(target), *(["--no-build-isolation"] if offline else []), str(src)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        if not offline:
            pytest.skip(f"cannot build the example without setuptools in the environment (and no index?): "
                        f"{r.stderr.strip().splitlines()[-1:]}")
        pytest.fail(f"pip install of {EXAMPLE} failed:\n{r.stderr}")
    assert list(target.glob("clsuite_example_strategy-*.dist-info"))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(target), *filter(None, [env.get("PYTHONPATH")])])
    return env


def clsuite(env, *args):
    return subprocess.run([sys.executable, "-m", "clsuite.cli", *args], capture_output=True, text=True, env=env,
                          timeout=600)


def test_list_shows_the_plugin(plugin_env):
    r = clsuite(plugin_env, "list", "strategies")
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if x.strip().startswith("l2 "))
    assert "[loss]" in line and "L2 pull" in line
    assert "weight=0.01" in r.stdout


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


def test_bad_plugin_parameter_is_a_user_error(plugin_env, tiny_stream_path, tmp_path):
    r = clsuite(plugin_env, "run", "--stream", tiny_stream_path, "--strategies", "l2(weight=-1)", "--out", str(tmp_path))
    assert r.returncode == 2 and "weight" in r.stderr and "Traceback" not in r.stderr
