"""Chaos: a sweep SIGKILLed at random moments and restarted each time ends with the records of an uninterrupted
sweep, none lost or half-written, and no temporary file, lock or checkpoint left. ``perf/chaos_sweep.py`` runs the
same with 50 kills."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from conftest import CLOCK, TINY_STREAM  # CLOCK: wall-clock fields and provenance
from clsuite.records import find_records, read_record
from clsuite.sweep import expand, load_grid, run_cells

# 2 strategies x 2 seeds, a checkpoint after the first of the two experiences; EWC's Fisher travels in it
GRID = {"streams": [TINY_STREAM], "strategies": ["naive", "ewc(samples=8)"], "seeds": [0, 1], "set": {"steps": [3]}}


def _strip(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _strip(v) for k, v in x.items() if k not in CLOCK}
    return [_strip(v) for v in x] if isinstance(x, list) else x


def _records(out: Path) -> dict[str, dict]:
    """Every record under ``out``, validated, without wall-clock fields and provenance."""
    return {str(p.relative_to(out)): _strip(read_record(p).model_dump()) for p in find_records([out])}


def _leftovers(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.name.endswith((".tmp", ".lock", ".ckpt")))


def _working(out: Path, pid: int) -> bool:
    """Whether process ``pid`` holds a cell's lock under ``out`` (its note names the pid): it is past its start."""
    for root, _, files in os.walk(out):
        for f in files:
            if f.endswith(".lock"):
                try:
                    if (Path(root) / f).read_text().split()[-1:] == [str(pid)]:
                        return True
                except (OSError, IndexError):
                    pass
    return False


def run_chaos(work: Path, kills: int, seed: int = 0, spread: float = 2.0,
              log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Run ``clsuite sweep`` on GRID, SIGKILL it at a random moment (seeded: uniform in ``spread`` x the
    uninterrupted sweep's time / ``kills``, after it takes its first cell lock) and restart it, ``kills`` times;
    then let it finish. A sweep that finishes before all the kills starts a new round on a fresh --out. Returns
    the figures, and whether every round ended identical to the uninterrupted sweep and clean."""
    work.mkdir(parents=True, exist_ok=True)
    grid = work / "grid.yaml"
    grid.write_text(yaml.safe_dump(GRID))
    t0 = time.monotonic()
    assert {o.status for o in run_cells(expand(load_grid(grid), grid, work / "reference"), progress=False)} == {"ran"}
    uninterrupted = time.monotonic() - t0
    reference = _records(work / "reference")
    span = spread * uninterrupted / kills
    rng = random.Random(seed)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one torch thread: the in-process reference's numbers
    figures = {"kills": 0, "restarts": 0, "rounds": 0, "identical": True, "clean": True, "problems": []}
    start = time.monotonic()
    while True:
        out = work / f"runs{figures['rounds']}"
        cmd = [sys.executable, "-m", "clsuite.cli", "sweep", str(grid), "--out", str(out), "--quiet"]
        while True:
            with open(work / "sweep.log", "w") as f:
                proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
            if figures["kills"] < kills:
                while proc.poll() is None and not _working(out, proc.pid):
                    time.sleep(0.002)
                delay = rng.uniform(0, span)
                time.sleep(delay)
                proc.send_signal(signal.SIGKILL)
            code = proc.wait(600)
            if code == -signal.SIGKILL:
                figures["kills"] += 1
                figures["restarts"] += 1
                log(f"kill {figures['kills']}: {delay:.2f} s after its first lock")
                continue
            if code != 0:
                raise AssertionError(f"the sweep failed ({code}): {(work / 'sweep.log').read_text()}")
            break
        figures["rounds"] += 1
        got, left = _records(out), _leftovers(out)
        if got != reference:
            figures["identical"] = False
            figures["problems"].append(f"{out}: records differ: {sorted(set(got) ^ set(reference)) or 'values'}")
        if left:
            figures["clean"] = False
            figures["problems"].append(f"{out}: left {left}")
        log(f"round {figures['rounds']}: {len(got)} records, identical {got == reference}, left {left}")
        if figures["kills"] >= kills:
            break
    figures["seconds"] = time.monotonic() - start
    figures["uninterrupted_seconds"] = uninterrupted
    return figures


@pytest.mark.slow
def test_sigkilled_sweep_ends_with_the_uninterrupted_records(tmp_path):
    figures = run_chaos(tmp_path, kills=10, seed=0, log=print)
    print(f"\nchaos: {figures['kills']} kills, {figures['restarts']} restarts, {figures['rounds']} round(s), "
          f"{figures['seconds']:.0f} s (uninterrupted in-process sweep {figures['uninterrupted_seconds']:.1f} s), "
          f"identical {figures['identical']}, clean {figures['clean']}")
    assert figures["kills"] >= 10
    assert figures["identical"] and figures["clean"], figures["problems"]
