"""Faults a cluster brings, in sweeps and runs: a full disk, a read-only --out, damaged checkpoints, two sweeps on one
--out, a killed sweep's lock, a killed Ray worker. Each error is one line naming the cell and the fix, finished records
stay intact, and a restart ends with the records of an uninterrupted sweep (docs/faults.md)."""
from __future__ import annotations

import errno
import fcntl
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from safetensors.torch import load_file, save_file

from conftest import TINY_STREAM, interrupt_after_first
from test_resume import comparable
from clsuite import atomic, runner
from clsuite.atomic import FileLock, remove_stale_temporaries
from clsuite.checkpoint import META
from clsuite.config import resolve_config
from clsuite.records import find_records, read_record
from clsuite.sweep import expand, load_grid, run_cells

SEEDS = [0, 1, 2, 3]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # subprocess sweeps: one torch thread, the in-process numbers


def grid(path: Path, seeds: list[int], steps: int = 2) -> Path:
    path.write_text(yaml.safe_dump({"streams": [TINY_STREAM], "strategies": ["naive"], "seeds": seeds,
                                    "set": {"steps": [steps]}}))
    return path


def records(out: Path) -> dict[str, dict]:
    """Every record under ``out`` by relative path, without wall-clock fields and provenance."""
    return {str(p.relative_to(out)): comparable(p) for p in find_records([out])}


def leftovers(out: Path, checkpoints: bool = True) -> list[str]:
    """Temporary files, lock files (and checkpoints) anywhere under ``out``, hidden folders included."""
    return sorted(str(p.relative_to(out)) for p in out.rglob("*")
                  if p.name.endswith((".tmp", ".lock")) or (checkpoints and p.name.endswith(".ckpt")))


def cell(seed: int) -> tuple[str, str]:
    """A cell's label (as the CLI prints it) and name (as errors give it)."""
    return f"tiny-test | naive [steps=2] | seed {seed}", f"tiny-test/naive/steps=2/seed{seed}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, dict]:
    """The records of an uninterrupted in-process sweep over SEEDS."""
    d = tmp_path_factory.mktemp("reference")
    g = grid(d / "g.yaml", SEEDS)
    assert {o.status for o in run_cells(expand(load_grid(g), g, d / "runs"), progress=False)} == {"ran"}
    assert not leftovers(d / "runs")
    return records(d / "runs")


def subset(reference: dict[str, dict], seeds: list[int]) -> dict[str, dict]:
    return {k: v for k, v in reference.items() if int(re.search(r"seed(\d+)", k).group(1)) in seeds}


# --- a full disk ------------------------------------------------------------------------------------------------
def fd_path(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


def fail_fsync(monkeypatch, matches) -> list[str]:
    """ENOSPC from ``os.fsync`` of every file whose path ``matches``: its data is on disk (a partial file), the
    filesystem reports it cannot keep it. Returns the paths it failed."""
    real, failed = os.fsync, []

    def fsync(fd: int) -> None:
        path = fd_path(fd)
        if os.path.isfile(path) and matches(path):
            failed.append(path)
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return failed


def fail_json_write(monkeypatch, matches) -> list[str]:
    """ENOSPC halfway through writing the JSON of every file whose path ``matches`` (half of it is on disk)."""
    failed = []

    def dump(obj, f, **kw):
        text = json.dumps(obj, **kw)
        if matches(fd_path(f.fileno())):
            f.write(text[:len(text) // 2])
            f.flush()
            failed.append(fd_path(f.fileno()))
            raise OSError(errno.ENOSPC, "No space left on device")
        f.write(text)

    monkeypatch.setattr(atomic, "json", SimpleNamespace(dump=dump))
    return failed


@pytest.mark.slow
@pytest.mark.parametrize("target", ["checkpoint", "record"])
def test_full_disk_stops_the_sweep_and_a_restart_completes_it(target, cli, tmp_path, monkeypatch, reference):
    """The disk fills while cell 2 writes its first checkpoint (fsync fails) or its record (half the JSON
    written): that cell fails with one line naming the file, the cell and the fix, the sweep stops (cell 3 would
    fail alike), cell 1's record is intact, no temporary file is left; freed, a restart completes the sweep."""
    g, out = grid(tmp_path / "g.yaml", [0, 1, 2]), tmp_path / "runs"
    if target == "checkpoint":
        failed = fail_fsync(monkeypatch, lambda p: "/seed1.ckpt/" in p)
    else:
        failed = fail_json_write(monkeypatch, lambda p: Path(p).name.startswith(".seed1.json."))
    code, stdout, err = cli("sweep", g, "--out", out, "--quiet")
    assert code == 1 and failed, err
    assert "sweep: 3 cells: 1 ran, 0 skipped, 1 failed, 1 not run (the sweep stopped at the error above)" in stdout
    cell_dir = out / "tiny-test" / "naive" / "steps=2"
    written = cell_dir / ("seed1.ckpt/exp0.model.safetensors" if target == "checkpoint" else "seed1.json")
    label, name = cell(1)
    assert err == (f"run failed ({label}): disk full while writing {written} for cell {name}: free space and re-run; "
                   "finished records are intact\n")
    assert records(out) == subset(reference, [0])  # cell 1 intact, nothing of cells 2 and 3
    assert read_record(cell_dir / "seed0.json").world_size == 1
    assert not leftovers(out, checkpoints=False)
    ckpt = cell_dir / "seed1.ckpt"
    if target == "checkpoint":  # the first checkpoint failed: none, and no orphaned file of it
        assert list(ckpt.iterdir()) == []
    else:  # the checkpoint after experience 1 stays for the restart
        assert json.loads((ckpt / META).read_text())["experience"] == 0
    monkeypatch.undo()  # space freed
    code, stdout, err = cli("sweep", g, "--out", out, "--quiet")
    assert code == 0 and "sweep: 3 cells: 2 ran, 1 skipped, 0 failed" in stdout, err
    assert records(out) == subset(reference, [0, 1, 2])
    assert not leftovers(out)


def test_full_disk_in_clsuite_run_is_one_line(cli, tmp_path, monkeypatch):
    out = tmp_path / "runs"
    fail_fsync(monkeypatch, lambda p: Path(p).name.startswith(".seed0.json."))
    code, _, err = cli("run", "--stream", TINY_STREAM, "--set", "steps=2", "--out", out, "--quiet")
    assert code == 2
    assert err == (f"error: disk full while writing {out / 'tiny-test/naive/seed0.json'} for cell "
                   "tiny-test/naive/seed0: free space and re-run; finished records are intact\n")
    assert leftovers(out) == ["tiny-test/naive/seed0.ckpt"]  # kept for --resume


def test_disk_full_error_is_still_an_oserror():
    e = atomic.DiskFullError(Path("/x/seed0.json"), "s/naive/seed0")
    assert isinstance(e, OSError) and e.errno == errno.ENOSPC and e.filename == "/x/seed0.json"
    import pickle
    assert str(pickle.loads(pickle.dumps(e))) == str(e)  # crosses process pools and Ray whole


# --- a read-only --out ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("error, message", [
    (errno.EACCES, " is not writable (Permission denied): make it writable or choose another --out; nothing was run"),
    (errno.EROFS, " is not writable (Read-only file system): make it writable or choose another --out; nothing was "
                  "run"),
    (errno.ENOSPC, ": the disk is full: free space and re-run; nothing was run"),
])
def test_unwritable_out_is_refused_before_any_training(error, message, cli, tmp_path, monkeypatch):
    """The sweep writes and deletes a probe file in --out first (chmod cannot make --out read-only for root, so
    the probe's file creation is made to fail)."""
    monkeypatch.setattr(runner, "run_one", lambda *a, **k: pytest.fail("a cell ran"))

    def mkstemp(**kw):
        raise OSError(error, os.strerror(error))

    monkeypatch.setattr(atomic, "tempfile", SimpleNamespace(mkstemp=mkstemp, mkdtemp=None))
    out = tmp_path / "runs"
    code, _, err = cli("sweep", grid(tmp_path / "g.yaml", [0]), "--out", out)
    assert code == 2 and err == f"error: --out {out}{message}\n", err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a 0o555 directory anyway; the probe is tested "
                    "with a failing file creation above")
def test_read_only_out_directory(cli, tmp_path):
    out = tmp_path / "runs"
    out.mkdir()
    out.chmod(0o555)
    try:
        code, _, err = cli("sweep", grid(tmp_path / "g.yaml", [0]), "--out", out)
    finally:
        out.chmod(0o755)
    assert code == 2 and "is not writable (Permission denied)" in err and len(err.splitlines()) == 1, err


# --- damaged checkpoints ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, tiny_stream) -> Path:
    """The checkpoint of naive, seed 0, steps 2 after its first experience (the run stopped there)."""
    out = tmp_path_factory.mktemp("interrupted")
    with pytest.MonkeyPatch.context() as m:
        return interrupt_after_first(m, tiny_stream, resolve_config(tiny_stream, "naive", 0, train={"steps": 2}), out)


def _truncate(name: str):
    def cut(ckpt: Path) -> None:
        f = ckpt / name
        f.write_bytes(f.read_bytes()[:f.stat().st_size // 2])
    return cut


def _edit_meta(edit):
    def change(ckpt: Path) -> None:
        meta = json.loads((ckpt / META).read_text())
        edit(meta)
        (ckpt / META).write_text(json.dumps(meta))
    return change


def _drop_tensor(ckpt: Path) -> None:
    f = ckpt / "exp0.state.safetensors"
    tensors = load_file(f)
    del tensors["rng.torch"]
    save_file(tensors, f)


DAMAGE = {
    "model file truncated": _truncate("exp0.model.safetensors"),
    "state file truncated": _truncate("exp0.state.safetensors"),
    "state file empty": lambda c: (c / "exp0.state.safetensors").write_bytes(b""),
    "model file missing": lambda c: (c / "exp0.model.safetensors").unlink(),
    "checkpoint.json truncated": _truncate(META),
    "checkpoint.json empty": lambda c: (c / META).write_text(""),
    "checkpoint.json lacks its rows": _edit_meta(lambda m: m.pop("rows")),
    "checkpoint.json with a damaged random state": _edit_meta(lambda m: m["rng"].update(python=[3, [1, 2], None])),
    "checkpoint.json with a numpy random state of the wrong size": _edit_meta(
        lambda m: m["rng"].update(numpy=["MT19937", [1, 2], 0, 0, 0.0])),
    "a tensor missing from the state file": _drop_tensor,
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_resume_from_a_damaged_checkpoint_is_a_one_line_error(damage, cli, tmp_path, interrupted):
    out = tmp_path / "runs"
    ckpt = out / "tiny-test" / "naive" / "seed0.ckpt"
    shutil.copytree(interrupted, ckpt)
    DAMAGE[damage](ckpt)
    code, _, err = cli("run", "--stream", TINY_STREAM, "--set", "steps=2", "--out", out, "--resume", "--quiet")
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"error: checkpoint {ckpt}") and ("incomplete or damaged" in err or "cannot be read" in err)
    assert err.rstrip().endswith("delete it, or run with --force to start the run over"), err


@pytest.mark.slow
def test_sweep_fails_the_cell_with_a_damaged_checkpoint_and_runs_the_others(cli, tmp_path, interrupted, reference):
    """A damaged checkpoint fails its cell (never silently discarded: deleting it, or --force, is the user's
    call); the other cells run; once it is deleted, a restart completes the sweep."""
    g, out = grid(tmp_path / "g.yaml", [0, 1]), tmp_path / "runs"
    ckpt = out / "tiny-test" / "naive" / "steps=2" / "seed0.ckpt"
    shutil.copytree(interrupted, ckpt)
    DAMAGE["model file truncated"](ckpt)
    code, stdout, err = cli("sweep", g, "--out", out, "--quiet")
    assert code == 1 and "sweep: 2 cells: 1 ran, 0 skipped, 1 failed" in stdout, err
    label, _ = cell(0)
    assert re.fullmatch(rf"run failed \({re.escape(label)}\): checkpoint {re.escape(str(ckpt))} is incomplete or "
                        r"damaged \(SafetensorError: .*\); delete it, or run with --force to start the run over\n",
                        err), err
    assert records(out) == subset(reference, [1])
    shutil.rmtree(ckpt)
    code, stdout, err = cli("sweep", g, "--out", out, "--quiet")
    assert code == 0 and "sweep: 2 cells: 1 ran, 1 skipped, 0 failed" in stdout, err
    assert records(out) == subset(reference, [0, 1]) and not leftovers(out)


# --- locks and stale temporary files ----------------------------------------------------------------------------
HOLD = ("import sys, time; from clsuite.atomic import FileLock; FileLock.acquire(sys.argv[1], note='holder'); "
        "print('held', flush=True); time.sleep(600)")


def test_a_lock_is_exclusive_and_dies_with_its_holder(tmp_path):
    path = tmp_path / "cell" / ".seed0.json.lock"
    lock = FileLock.acquire(path, note="me")
    assert path.read_text() == "me" and FileLock.acquire(path, wait=False) is None
    lock.release()
    assert not path.exists()
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        assert FileLock.acquire(path, wait=False) is None
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(30)
    assert path.read_text() == "holder"  # the killed holder's file stays, but not its lock
    t0 = time.monotonic()
    with FileLock.acquire(path, wait=False) as lock:
        assert lock is not None and time.monotonic() - t0 < 1
    assert not path.exists()


def test_only_temporary_files_of_dead_writers_are_removed(tmp_path):
    stale = tmp_path / ".seed0.json.abc123.tmp"
    stale.write_text("half")
    stale_dir = tmp_path / ".seed0.model.xyz.tmp"
    stale_dir.mkdir()
    (stale_dir / "weights").write_text("half")
    live = tmp_path / ".seed1.json.def456.tmp"
    live.write_text("being written")
    kept = [tmp_path / "seed0.json", tmp_path / ".hidden"]
    for k in kept:
        k.write_text("{}")
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as write_with holds its temporary file
    try:
        assert sorted(remove_stale_temporaries(tmp_path)) == sorted([stale, stale_dir])
    finally:
        os.close(fd)
    assert live.exists() and all(k.exists() for k in kept)


@pytest.mark.slow
def test_a_held_cell_is_skipped_then_waited_for(tmp_path, reference):
    """In-process sweep: the cell another process holds is left for last, then waited for (and run here, as the
    holder wrote no record)."""
    g, out = grid(tmp_path / "g.yaml", [0, 1]), tmp_path / "runs"
    cells = expand(load_grid(g), g, out)
    lock = FileLock.acquire(cells[0].path.with_name(".seed0.json.lock"))
    outcomes = []
    t = threading.Thread(target=lambda: outcomes.extend(run_cells(cells, progress=False)))
    t.start()
    try:
        deadline = time.monotonic() + 120
        while not cells[1].path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        assert cells[1].path.exists() and not cells[0].path.exists() and t.is_alive()  # waiting for cell 1's lock
    finally:
        lock.release()
        t.join(120)
    assert [o.status for o in outcomes] == ["ran", "ran"]
    assert records(out) == subset(reference, [0, 1]) and not leftovers(out)


def summary(stdout: str) -> tuple[int, int]:
    ran, skipped = re.search(r"sweep: \d+ cells: (\d+) ran, (\d+) skipped, 0 failed", stdout).groups()
    return int(ran), int(skipped)


@pytest.mark.slow
def test_two_sweeps_on_one_out_run_every_cell_once(tmp_path, reference):
    g, out = grid(tmp_path / "g.yaml", SEEDS), tmp_path / "runs"
    cmd = [sys.executable, "-m", "clsuite.cli", "sweep", str(g), "--out", str(out), "--quiet"]
    procs = [subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    counts = [summary(stdout) for stdout, _ in results]
    print(f"\ntwo sweeps at once: (ran, skipped) = {counts}")
    assert sum(r for r, _ in counts) == len(SEEDS) and sum(s for _, s in counts) == len(SEEDS)
    assert records(out) == reference and not leftovers(out)


# --- a Ray worker killed mid-cell -------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed: pip install 'clsuite[ray]'")
def test_ray_worker_killed_mid_cell(cli, tmp_path, reference):
    """SIGKILL the Ray worker running cell 1 once its first checkpoint is written: that cell fails with one line
    (Ray does not retry it), cell 2 completes, and a restart resumes cell 1 from its checkpoint: the records of
    an uninterrupted sweep. The worker's pid is the one its cell lock names."""
    g, out = grid(tmp_path / "g.yaml", [0, 1], steps=20), tmp_path / "runs"
    cell_dir = out / "tiny-test" / "naive" / "steps=20"
    killed = {}

    def kill_when_checkpointed() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed:
            try:
                if (cell_dir / "seed0.ckpt" / META).exists() and not (cell_dir / "seed0.json").exists():
                    host, pid = (cell_dir / ".seed0.json.lock").read_text().split()
                    os.kill(int(pid), signal.SIGKILL)
                    killed["pid"] = int(pid)
            except (FileNotFoundError, ValueError):  # the lock's note not written yet
                pass
            time.sleep(0.005)

    killer = threading.Thread(target=kill_when_checkpointed)
    killer.start()
    code, stdout, err = cli("sweep", g, "--backend", "ray", "--workers", "2", "--out", out, "--quiet")
    killer.join()
    assert killed and code == 1 and "sweep: 2 cells: 1 ran, 0 skipped, 1 failed" in stdout, err
    label = "tiny-test | naive [steps=20] | seed 0"
    assert (f"run failed ({label}): the Ray worker (WorkerCrashedError) running it died; re-run the sweep to resume "
            "the cell from its last checkpoint\n") in err, err
    assert json.loads((cell_dir / "seed0.ckpt" / META).read_text())["experience"] == 0
    assert (cell_dir / "seed1.json").exists() and not (cell_dir / "seed0.json").exists()
    code, stdout, err = cli("sweep", g, "--backend", "ray", "--workers", "2", "--out", out, "--quiet")
    assert code == 0 and "sweep: 2 cells: 1 ran, 1 skipped, 0 failed" in stdout, err
    ref = tmp_path / "ref"
    assert {o.status for o in run_cells(expand(load_grid(g), g, ref), progress=False)} == {"ran"}
    assert records(out) == records(ref) and not leftovers(out)
