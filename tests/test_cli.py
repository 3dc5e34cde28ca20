"""The command line as a user types it: exit codes, one-line errors, run -> show -> leaderboard."""
import subprocess
import sys

import pytest


def clsuite(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "clsuite.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("args, match", [
    (["run", "--stream", "tiny-synthetc"], "did you mean 'tiny-synthetic'"),
    (["run", "--stream", "tiny-synthetic", "--strategies", "sam(rho=)"], "expected a value"),
    (["run", "--stream", "tiny-synthetic", "--seeds", "a,b"], "comma-separated integers"),
    (["run", "--stream", "tiny-synthetic", "--set", "lr"], "KEY=VALUE"),
    (["run", "--stream", "/nonexistent/s.yaml"], "not found"),
    (["show", "/nonexistent.json"], "not found"),
    (["leaderboard", "/nonexistent"], "does not exist"),
    (["list", "widgets"], "cannot list"),
])
def test_user_errors_exit_2_without_traceback(args, match):
    r = clsuite(*args)
    assert r.returncode == 2, r.stderr
    assert match in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_usage_error_exits_2():
    r = clsuite("run")
    assert r.returncode == 2 and "Traceback" not in r.stderr


@pytest.mark.slow
def test_list_shows_everything():
    r = clsuite("list")
    assert r.returncode == 0
    for word in ("tiny-synthetic", "naive", "acc", "forgetting", "higher is better", "tiny-synthetic-base"):
        assert word in r.stdout


@pytest.mark.slow
def test_run_show_leaderboard(tmp_path, tiny_stream_path):
    r = clsuite("run", "--stream", tiny_stream_path, "--strategies", "naive", "--seeds", "0,1", "--out",
                str(tmp_path / "runs"), "--leaderboard", str(tmp_path / "lb"), "--quiet")
    assert r.returncode == 0, r.stderr
    assert "it/s]" not in r.stderr, r.stderr  # --quiet: no progress bar, also none from transformers/datasets
    md = (tmp_path / "lb" / "tiny-test" / "leaderboard.md").read_text()
    assert "| naive" in md and "± " in md and "acc ↑" in md and "forgetting ↓" in md
    assert (tmp_path / "lb" / "tiny-test" / "leaderboard.csv").exists()
    assert (tmp_path / "lb" / "tiny-test" / "leaderboard.png").stat().st_size > 1000
    s = clsuite("show", str(tmp_path / "runs" / "tiny-test" / "naive" / "seed1.json"))
    assert s.returncode == 0 and "after reversal" in s.stdout and '"acc"' in s.stdout
