"""Checkpoints and resume: a run interrupted after an experience and resumed writes the record of an uninterrupted one."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from clsuite import checkpoint
from clsuite.checkpoint import META
from clsuite.errors import UserError
from clsuite.config import resolve_config
from clsuite.records import record_path
from clsuite.runner import run_one

from conftest import Killed, comparable, interrupt_after_first


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["naive", "sam", "ewc(samples=8)", "replay(general=0.5)", "wiseft", "lora",
                                  "lora(mode=merge)+wiseft", "sam+ewc(samples=8)+replay"])
def test_resumed_run_equals_uninterrupted(spec, tiny_stream, tmp_path, monkeypatch):
    cfg = resolve_config(tiny_stream, spec, 0)
    ref = run_one(tiny_stream, cfg, tmp_path / "ref", progress=False)
    assert not ref.with_suffix(".ckpt").exists()  # deleted once the record is written
    ckpt = interrupt_after_first(monkeypatch, tiny_stream, cfg, tmp_path / "cut")
    resumed = run_one(tiny_stream, cfg, tmp_path / "cut", progress=False, resume=True)
    assert comparable(resumed) == comparable(ref)
    assert not ckpt.exists()


def test_checkpoint_holds_what_restores_the_model(tiny_stream, tmp_path, monkeypatch):
    """Plain model: every weight; lora(mode=continue): the adapter only; lora(mode=merge): the merged model."""
    names = {}
    for spec in ("naive", "lora", "lora(mode=merge)"):
        ckpt = interrupt_after_first(monkeypatch, tiny_stream, resolve_config(tiny_stream, spec, 0), tmp_path / spec)
        meta = json.loads((ckpt / META).read_text())
        assert sorted(p.name for p in ckpt.iterdir()) == sorted([META, *meta["files"].values()])
        names[spec] = set(load_file(ckpt / meta["files"]["model"]))
        state = load_file(ckpt / meta["files"]["state"])
        assert "rng.torch" in state and len(meta["rows"]) == 2 and len(meta["experiences"]) == 1
    assert names["lora"] and all(".lora_" in n for n in names["lora"])
    assert names["lora(mode=merge)"] == names["naive"] and not any(".lora_" in n for n in names["naive"])


def test_kill_while_writing_keeps_the_previous_checkpoint(tiny_stream, tmp_path, monkeypatch):
    """A write that dies after experience 1's model file is in place leaves experience 0's checkpoint usable."""
    # three tasks: no checkpoint follows the last experience (its record is written at once)
    tiny_stream = dataclasses.replace(tiny_stream, tasks=tiny_stream.tasks + [
        dataclasses.replace(tiny_stream.tasks[0], name="addition_again")])
    cfg = resolve_config(tiny_stream, "ewc(samples=8)+replay", 0)
    ref = run_one(tiny_stream, cfg, tmp_path / "ref", progress=False)
    real = checkpoint._write_tensors

    def die_on_second_state_file(path, tensors):
        if path.name == "exp1.state.safetensors":
            path.with_name(f".{path.name}.tmp").write_bytes(b"half a file")
            raise Killed
        real(path, tensors)

    monkeypatch.setattr(checkpoint, "_write_tensors", die_on_second_state_file)
    with pytest.raises(Killed):
        run_one(tiny_stream, cfg, tmp_path / "cut", progress=False)
    monkeypatch.setattr(checkpoint, "_write_tensors", real)
    ckpt = record_path(tmp_path / "cut", cfg).with_suffix(".ckpt")
    assert (ckpt / "exp1.model.safetensors").exists()
    assert json.loads((ckpt / META).read_text())["experience"] == 0
    assert comparable(run_one(tiny_stream, cfg, tmp_path / "cut", progress=False, resume=True)) == comparable(ref)


def test_checkpoint_of_other_settings_or_without_resume(tiny_stream, tmp_path, monkeypatch):
    cfg = resolve_config(tiny_stream, "naive", 0)
    ckpt = interrupt_after_first(monkeypatch, tiny_stream, cfg, tmp_path)
    other = resolve_config(tiny_stream, "naive", 0, train={"lr": 1e-5})
    with pytest.raises(UserError, match=r"was made with other config \(other settings: .*\); delete it, or run with --force"):
        run_one(tiny_stream, other, tmp_path, progress=False, resume=True)
    with pytest.raises(UserError, match=r"interrupted run of this cell: add --resume"):
        run_one(tiny_stream, cfg, tmp_path, progress=False)
    (ckpt / "exp0.model.safetensors").write_bytes(b"torn")
    with pytest.raises(UserError, match=r"incomplete or damaged .*--force"):
        run_one(tiny_stream, cfg, tmp_path, progress=False, resume=True)
    fresh = run_one(tiny_stream, cfg, tmp_path, progress=False, force=True)  # --force starts over
    assert json.loads(fresh.read_text())["status"] == "complete" and not ckpt.exists()


def test_plugin_state_must_be_tensors_and_json():
    with pytest.raises(TypeError, match="holds a set"):
        checkpoint._split({"seen": {1, 2}}, {}, "plugin0", "mine")
    with pytest.raises(TypeError, match="dict key 3"):
        checkpoint._split({"counts": {3: 1}}, {}, "plugin0", "mine")
    tensors = {}
    state = {"a": [torch.ones(2), (1, "x")], "b": None}
    back = checkpoint._join(json.loads(json.dumps(checkpoint._split(state, tensors, "plugin0", "mine"))), tensors,
                            torch.device("cpu"))
    assert torch.equal(back["a"][0], torch.ones(2)) and back["a"][1] == [1, "x"] and back["b"] is None


@pytest.mark.slow
def test_sigkill_mid_experience_then_resume(tiny_stream, tiny_stream_path, tmp_path):
    """A real kill: SIGKILL the CLI while it trains experience 2 (index 1); ``--resume`` then writes the record of an
    uninterrupted run. The kill waits for the progress bar to show a step of that experience."""
    spec, steps = "sam+ewc(samples=8)+replay", 30
    cfg = resolve_config(tiny_stream, spec, 0, train={"steps": steps})
    ref = run_one(tiny_stream, cfg, tmp_path / "ref", progress=False)
    out = tmp_path / "cut"
    cmd = [sys.executable, "-m", "clsuite.cli", "run", "--stream", tiny_stream_path, "--strategies", spec,
           "--set", f"steps={steps}", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = tmp_path / "killed.log"
    training = re.compile(rf"train {tiny_stream.tasks[1].name}: +\d+%\|[^|]*\| *[1-9]\d*/{steps}")
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=f)
        try:
            deadline = time.monotonic() + 300
            while proc.poll() is None and time.monotonic() < deadline and not training.search(log.read_text()):
                time.sleep(0.01)
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(30) == -signal.SIGKILL, log.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
    ckpt = record_path(out, cfg).with_suffix(".ckpt")
    assert json.loads((ckpt / META).read_text())["experience"] == 0  # killed before experience 1's checkpoint
    assert not record_path(out, cfg).exists()
    r = subprocess.run(cmd + ["--resume", "--quiet"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert comparable(record_path(out, cfg)) == comparable(ref)
    assert not ckpt.exists()
