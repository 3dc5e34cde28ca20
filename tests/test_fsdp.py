"""Sharded data parallelism (parallel=fsdp): 2 gloo processes under torch's fully_shard against one process on the
same global batches (naive, SAM and its variants, SAM+EWC, SAM+LoRA, Wise-FT, SAM+replay with gradient
accumulation, SAM+EWC with activation checkpointing against one process without it), a per-shard norm caught, EWC's
Fisher a mean of squares; sharded checkpoints resumed (EWC, Wise-FT, a LoRA adapter); a sharded run's record against
one process's, and the torchrun command SIGKILLed, then resumed to the record of the uninterrupted sharded run."""
from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import TINY_STREAM, Killed, assert_like_one_process, comparable, gloo_group, spawn_ranks, tiny_llama
import pytest
import torch
from torch.distributed.tensor import DTensor
from test_distributed import EVAL, TOL, WORLD, Snapshot as WholeSnapshot, _max_diff

from clsuite import sharding
from clsuite.checkpoint import META
from clsuite.config import resolve_config
from clsuite.engine import Context, run_stream, set_seed
from clsuite.errors import UserError
from clsuite.memory import prepare_model
from clsuite.records import record_path
from clsuite.runner import run_one
from clsuite.strategies._anchored import per_example_importance
from clsuite.strategy import build_strategy
from clsuite.streams import load_stream

SCENARIOS = {  # name: (spec, training settings of the sharded run; the one-process reference has grad_accum 1)
    "naive": ("naive", {}),
    "sam": ("sam(rho=0.1)", {}),
    "asam": ("asam", {}),
    "looksam": ("looksam(rho=0.1, k=2)", {}),
    "msam": ("msam", {}),
    "sam+ewc": ("sam(rho=0.1)+ewc(lambda=1000, samples=7)", {}),  # 7 rows: a round where rank 1 has none
    "sam+lora": ("sam(rho=0.1)+lora(r=4)", {}),
    "lora+wiseft": ("lora(r=4)+wiseft", {}),
    "sam+wiseft(previous)": ("sam(rho=0.1)+wiseft(anchor=previous)", {}),
    "sam+replay, grad_accum 2": ("sam(rho=0.1)+replay(size=16, ratio=0.5)", {"grad_accum": 2}),
    "sam+ewc, activation checkpointing": ("sam(rho=0.1)+ewc(lambda=1000, samples=7)",
                                          {"activation_checkpointing": True}),  # the reference without it
}
RESUMED = ("wiseft+ewc(samples=4)", "lora(r=4)+ewc(samples=4)")  # sharded anchors, Fisher, an adapter


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


class Snapshot(WholeSnapshot):
    """All weights, whole, before every step and after each experience (a collective under FSDP)."""
    fsdp_ready = True

    def _take(self, ctx) -> None:
        self.weights.append(torch.cat([_full(p.detach()).reshape(-1).clone() for p in ctx.model.parameters()]))


def _run(stream, spec: str, train: dict) -> dict:
    """Train and evaluate the stream with a 2-layer tiny Llama; what must agree with one process."""
    cfg = resolve_config(stream, spec, 0, train=train, eval=EVAL)
    set_seed(0)
    model, tok = tiny_llama(layers=2)
    prepare_model(model, cfg.train)  # activation checkpointing, as run_one does
    snap = Snapshot()
    plugins = build_strategy(cfg.strategy) + [snap]
    ctx = Context(model, tok, stream, cfg, plugins, random.Random(0))
    result = run_stream(ctx, progress=False)
    out = {"weights": snap.weights, "rows": result["rows"], "example_passes": ctx.example_passes,
           "loss_curves": [e["loss_curve"] for e in result["experiences"]],
           "sharded": sharding.is_sharded_model(ctx.model)}
    ewc = next((p for p in plugins if p.name == "ewc"), None)
    if ewc is not None:
        out["fisher"] = [{n: _full(f) for n, f in fisher.items()} for fisher in ewc.fishers]
    return out


def _fisher_both_ways(stream) -> dict:
    """On a freshly sharded model: EWC's Fisher as clsuite takes it (squares summed over ranks), and as a reduction
    before squaring would (the square of each round's mean gradient over ranks)."""
    cfg = resolve_config(stream, "ewc", 0, train={"parallel": "fsdp"})
    set_seed(0)
    model, tok = tiny_llama(layers=2)
    ctx = Context(model, tok, stream, cfg, build_strategy("ewc"), random.Random(0))
    ctx.task = stream.tasks[0]
    sharding.apply_fsdp(ctx.model)
    rows = [stream.tasks[0].train[i] for i in range(6)]
    right = sharding.mean_squared_gradients(ctx, rows, lambda r: ctx.loss([r]), "loss")
    params = dict(ctx.model.named_parameters())
    wrong = {n: torch.zeros_like(p) for n, p in params.items()}
    for row in rows[torch.distributed.get_rank()::WORLD]:  # 3 rounds of one row each
        for p in params.values():
            p.grad = None
        ctx.loss([row]).backward()  # FSDP averages the two ranks' gradients, then they are squared
        for n, p in params.items():
            wrong[n] += p.grad.detach() ** 2
    return {"right": {n: _full(f) for n, f in right.items()},
            "wrong": {n: _full(f / len(rows)) for n, f in wrong.items()}, "rows": rows}


def _resumed(stream, spec: str, tmp: Path) -> tuple[Path, Path]:
    """A sharded run, and the same run stopped on every rank right after its first checkpoint, then resumed."""
    from clsuite import runner
    cfg = resolve_config(stream, spec, 0, model=str(tmp / "model"), train={"parallel": "fsdp"}, eval=EVAL)
    whole = run_one(stream, cfg, tmp / "whole", progress=False)
    real = runner.save_checkpoint

    def save_then_die(*args):
        real(*args)
        raise Killed

    runner.save_checkpoint = save_then_die
    try:
        run_one(stream, cfg, tmp / "cut", progress=False)
    except Killed:
        pass
    finally:
        runner.save_checkpoint = real
    ckpt = record_path(tmp / "cut", cfg).with_suffix(".ckpt")
    assert json.loads((ckpt / META).read_text())["sharded"] == {"world_size": WORLD}
    return whole, run_one(stream, cfg, tmp / "cut", progress=False, resume=True)


def _worker(rank: int, port: int, tmp: str) -> None:
    with gloo_group(rank, port, WORLD):
        stream = load_stream(TINY_STREAM)
        res = {name: _run(stream, spec, {**train, "parallel": "fsdp"}) for name, (spec, train) in SCENARIOS.items()}
        real = sharding._sum_over_shards
        sharding._sum_over_shards = lambda t: None  # the bug of a per-shard norm: each rank normalises by its own
        try:
            res["sam, per-shard norm"] = _run(stream, "sam(rho=0.1)", {"parallel": "fsdp"})
        finally:
            sharding._sum_over_shards = real
        res["fisher"] = _fisher_both_ways(stream)
        res["resumed"] = {spec: _resumed(stream, spec, Path(tmp)) for spec in RESUMED}
        cli = load_stream(TINY_STREAM)  # the record the torchrun command below writes, uninterrupted
        res["record"] = run_one(cli, _cli_config(cli, parallel="fsdp"), Path(tmp) / "full", progress=False)
        torch.save(res, Path(tmp) / f"result{rank}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Both ranks' results and the one-process references."""
    tmp = tmp_path_factory.mktemp("fsdp")
    model, tok = tiny_llama(layers=2)
    model.save_pretrained(tmp / "model")
    tok.save_pretrained(tmp / "model")
    ranks = spawn_ranks(_worker, tmp, WORLD)
    stream = load_stream(TINY_STREAM)
    ref = {name: _run(stream, spec, {**train, "grad_accum": 1, "activation_checkpointing": False})
           for name, (spec, train) in SCENARIOS.items()}
    return ranks, ref


def close(a, b, rel: float = 1e-4, path: str = "") -> list[str]:
    """Where two JSON-like values differ: floats beyond ``rel`` (relative, absolute below 1), anything else at all."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{path}: keys {sorted(a.keys() ^ b.keys())}"]
        return [d for k in a for d in close(a[k], b[k], rel, f"{path}.{k}")]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: {len(a)} != {len(b)} items"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in close(x, y, rel, f"{path}[{i}]")]
    if isinstance(a, float) and isinstance(b, (int, float)) and not isinstance(b, bool):
        ok = math.isclose(a, b, rel_tol=rel, abs_tol=rel) or (math.isnan(a) and math.isnan(b))
        return [] if ok else [f"{path}: {a} != {b}"]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


@pytest.mark.slow
@pytest.mark.parametrize("name", SCENARIOS)
def test_sharded_equals_one_process(runs, name):
    (r0, r1), ref = runs
    a, b, one = r0[name], r1[name], ref[name]
    assert a["sharded"] and not one["sharded"]
    assert len(a["weights"]) == 2 * (3 + 1)
    assert_like_one_process(a, b, one, f"fsdp, {name}", TOL)  # the ranks' shards make one model
    assert a["example_passes"] == one["example_passes"]
    assert len(a["rows"]) == 3 and not close(a["rows"], one["rows"])  # every rank evaluated, rank 0 as one process
    assert a["rows"] == b["rows"]


@pytest.mark.slow
@pytest.mark.parametrize("spec", RESUMED)
def test_sharded_checkpoint_resumes_to_the_uninterrupted_record(runs, spec):
    whole, resumed = runs[0][0]["resumed"][spec]
    assert _stripped(resumed) == _stripped(whole)
    assert not resumed.with_suffix(".ckpt").exists()


@pytest.mark.slow
def test_a_per_shard_norm_is_caught(runs):
    (r0, _), ref = runs
    diff = _max_diff(r0["sam, per-shard norm"]["weights"], ref["sam"]["weights"])
    print(f"\nSAM with each rank's own norm: max |w - w_single| = {diff:.3g}")
    assert diff > 100 * TOL


@pytest.mark.slow
def test_ewc_fisher_is_the_mean_of_squares_over_shards(runs):
    (r0, r1), ref = runs
    f0, f1, one = r0["sam+ewc"]["fisher"], r1["sam+ewc"]["fisher"], ref["sam+ewc"]["fisher"]
    assert len(f0) == len(one) == 1  # after experience 1 of 2
    for a, b, c in zip(f0, f1, one):
        assert all(torch.equal(a[n], b[n]) for n in a)
        scale = max(float(c[n].abs().max()) for n in c)
        assert scale > 0 and max(float((a[n] - c[n]).abs().max()) for n in a) <= 1e-6 * scale
    # on a fresh model: against per_example_importance in one process; a reduction before squaring is far off
    got = r0["fisher"]
    stream = load_stream(TINY_STREAM)
    cfg = resolve_config(stream, "ewc", 0)
    set_seed(0)
    model, tok = tiny_llama(layers=2)
    ctx = Context(model, tok, stream, cfg, [], random.Random(0))
    ctx.task = stream.tasks[0]
    want = per_example_importance(ctx, got["rows"], lambda r: ctx.loss([r]), lambda g: g.pow(2), "loss")
    scale = max(float(w.abs().max()) for w in want.values())
    right = max(float((got["right"][n] - w).abs().max()) for n, w in want.items())
    wrong = max(float((got["wrong"][n] - w).abs().max()) for n, w in want.items())
    print(f"\nFisher: mean of squares off by {right / scale:.2g}, square of means by {wrong / scale:.2g} (relative)")
    assert right <= 1e-6 * scale and wrong > 0.1 * scale


def test_one_process_refuses_fsdp_and_the_default_leaves_the_config_as_it_was(tiny_stream, tmp_path):
    cfg = resolve_config(tiny_stream, "naive", 0, train={"parallel": "fsdp"})
    assert cfg.train.parallel == "fsdp" and "parallel" not in cfg.model_dump()["train"]  # not in the fingerprint
    assert resolve_config(tiny_stream, "naive", 0).model_dump() == cfg.model_dump()
    with pytest.raises(UserError, match=r"parallel=fsdp shards the model over processes and this is one process: "
                                        r"launch it with torchrun"):
        run_one(tiny_stream, cfg, tmp_path, progress=False)
    assert not list(tmp_path.rglob("*.json"))


def test_a_checkpoint_resumes_only_with_its_layout(tiny_stream, tmp_path, monkeypatch):
    """A sharded checkpoint needs parallel=fsdp and its number of processes; an unsharded one needs no sharding."""
    from clsuite import checkpoint, distributed
    ddp = resolve_config(tiny_stream, "naive", 0)
    fsdp = resolve_config(tiny_stream, "naive", 0, train={"parallel": "fsdp"})
    sharded = {"sharded": {"world_size": 2}}
    checkpoint._check_layout(tmp_path, {}, ddp)
    with pytest.raises(UserError, match=r"sharded over 2 processes \(parallel=fsdp\): resume it with torchrun "
                                        r"--nproc_per_node 2 and --set parallel=fsdp, or delete it"):
        checkpoint._check_layout(tmp_path, sharded, ddp)
    monkeypatch.setattr(distributed, "world_size", lambda: 4)
    with pytest.raises(UserError, match="sharded over 2 processes and this run has 4: resume it with torchrun "
                                        "--nproc_per_node 2"):
        checkpoint._check_layout(tmp_path, sharded, fsdp)
    with pytest.raises(UserError, match=r"holds whole weights and this run shards them \(parallel=fsdp\)"):
        checkpoint._check_layout(tmp_path, {}, fsdp)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    checkpoint._check_layout(tmp_path, sharded, fsdp)


def test_what_fsdp_does_not_run_is_refused(monkeypatch):
    """Checked in a stand-in for a 2-process world: strategies whose state is not sharded, lora(mode=merge),
    sharpness, saving the model, bf16 weights; a composition of what runs passes."""
    from clsuite import distributed
    stream = load_stream(TINY_STREAM)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    for spec, train, eval_, save, message in (
            ("si", {}, {}, False, "strategy 'si' does not run under parallel=fsdp"),
            ("lora(mode=merge)", {}, {}, False, r"lora\(mode=merge\) does not run under parallel=fsdp"),
            ("sam", {}, {"sharpness": "cheap"}, False, "--sharpness cheap does not run under parallel=fsdp"),
            ("sam", {}, {}, True, "--save-model does not run under parallel=fsdp"),
            ("sam", {"precision": "bf16-weights"}, {}, False, "precision=bf16-weights does not run under "
                                                              "parallel=fsdp"),
            ("sam+ewc+lora+replay+wiseft", {"precision": "bf16"}, {}, False, None)):
        cfg = resolve_config(stream, spec, 0, train={**train, "parallel": "fsdp"}, eval=eval_)
        if message is None:
            sharding.check(cfg, build_strategy(cfg.strategy), save)
            continue
        with pytest.raises(UserError, match=message):
            sharding.check(cfg, build_strategy(cfg.strategy), save)


# --- a record; the command line: torchrun, a SIGKILL and --resume ------------------------------------------------
SPEC, STEPS = "sam+ewc(samples=8)", 12
CLOCK = ("peak_memory", "peak_memory_bytes")  # measured per run, like the wall-clock fields conftest drops


def _cli_config(stream, **train):
    return resolve_config(stream, SPEC, 0, train={"steps": STEPS, **train}, eval={"sharpness": "off"})


def _torchrun(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
            "-m", "clsuite.cli", "run", "--stream", TINY_STREAM, "--strategies", SPEC, "--set", f"steps={STEPS}",
            "--set", "parallel=fsdp", "--out", str(out), *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _stripped(path: Path) -> dict:
    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in CLOCK}
        return [strip(v) for v in x] if isinstance(x, list) else x
    return strip(comparable(path))


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts its workers in sessions of their own)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


@pytest.mark.slow
def test_sharded_record_equals_one_process(runs, tmp_path):
    """What ``torchrun --nproc_per_node 2 -m clsuite.cli run ... --set parallel=fsdp`` runs (``run_one`` on 2 ranks;
    the SIGKILL test below runs the command itself and gets this very record) against one process."""
    (r0, r1), _ = runs
    assert r0["record"] == r1["record"] and r0["record"].exists()
    peaks = [e["peak_memory_bytes"] for e in json.loads(r0["record"].read_text())["experiences"]]
    assert all(len(p) == WORLD and all(b > 10 * 2**20 for b in p) for p in peaks)  # each process's training peak
    stream = load_stream(TINY_STREAM)
    one = run_one(stream, _cli_config(stream), tmp_path, progress=False)
    a, b = _stripped(r0["record"]), _stripped(one)
    assert (a.pop("world_size"), a.pop("parallel"), b.pop("world_size")) == (WORLD, "fsdp", 1)
    assert a["config"] == b["config"] and a["fingerprint"] == b["fingerprint"]
    differences = close(a, b, rel=1e-4)
    assert not differences, differences[:5]
    worst = max(abs(x - y) / max(abs(y), 1e-12) for ea, eb in zip(a["experiences"], b["experiences"])
                for x, y in zip(ea["loss_curve"], eb["loss_curve"]))
    print(f"\nfsdp vs one process: largest relative loss difference {worst:.2g}; R equal: {a['R'] == b['R']}")


@pytest.mark.slow
def test_sigkill_of_a_sharded_run_then_resume(runs, tmp_path):
    """SIGKILL torchrun and both workers while they train experience 2 (index 1); ``--resume`` with the same
    command then writes the record of the uninterrupted sharded run."""
    out = tmp_path / "cut"
    log = tmp_path / "killed.log"
    training = re.compile(rf"train reversal: +\d+%\|[^|]*\| *[1-9]\d*/{STEPS}")
    with open(log, "w") as f:
        proc = subprocess.Popen(_torchrun(out), env=_env(), stdout=f, stderr=f)
        try:
            deadline = time.monotonic() + 300
            while proc.poll() is None and time.monotonic() < deadline and not training.search(log.read_text()):
                time.sleep(0.01)
            victims = [proc.pid, *_descendants(proc.pid)]
            for pid in victims:
                os.kill(pid, signal.SIGKILL)
            assert proc.wait(30) == -signal.SIGKILL, log.read_text()[-3000:]
        finally:
            if proc.poll() is None:
                proc.kill()
    assert len(victims) >= 1 + WORLD
    ckpt = record_path(out, _cli_config(load_stream(TINY_STREAM))).with_suffix(".ckpt")
    meta = json.loads((ckpt / META).read_text())
    assert meta["experience"] == 0 and meta["sharded"] == {"world_size": WORLD}  # killed before experience 1's
    assert sorted(meta["files"]["model"]) == ["exp0.rank0.model.safetensors", "exp0.rank1.model.safetensors"]
    r = subprocess.run(_torchrun(out, "--resume", "--quiet"), env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _stripped(ckpt.with_suffix(".json")) == _stripped(runs[0][0]["record"])
    assert not ckpt.exists()
