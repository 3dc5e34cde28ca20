"""Data parallelism: 2 gloo processes against one process on the same global batches (naive, SAM, SAM+EWC with a
Fisher from the first experience, SAM+replay with gradient accumulation), the ranks bit-identical after every step,
rank 0 alone evaluating and writing; and bf16 autocast with SAM against fp32."""
from __future__ import annotations

import os
import random
import socket
from datetime import timedelta
from pathlib import Path

from conftest import TINY_STREAM, tiny_llama
import pytest
import torch
import torch.multiprocessing as mp

from clsuite import distributed
from clsuite.engine import Context, run_stream, set_seed, train_experience
from clsuite.errors import UserError
from clsuite.records import read_record
from clsuite.config import resolve_config
from clsuite.runner import run_one
from clsuite.strategy import Strategy, build_strategy
from clsuite.streams import load_stream

WORLD = 2
EVAL = {"max_examples": 1}
SCENARIOS = {  # name: (spec, training settings of the 2-process run; the one-process reference uses grad_accum 1)
    "naive": ("naive", {}),
    "sam": ("sam(rho=0.1)", {}),
    "sam+ewc": ("sam(rho=0.1)+ewc(lambda=1000, samples=8)", {}),
    "sam+replay, grad_accum 2": ("sam(rho=0.1)+replay(size=16, ratio=0.5)", {"grad_accum": 2}),
}
TOL = 1e-5  # float32 sums in another order, compounded over 6 AdamW steps


class Snapshot(Strategy):
    """Records all weights before every step and after each experience (after every other plugin's hooks)."""

    def __init__(self):
        super().__init__()
        self.weights: list[torch.Tensor] = []

    def _take(self, ctx) -> None:
        self.weights.append(torch.cat([p.detach().reshape(-1).clone() for p in ctx.model.parameters()]))

    def before_training_iteration(self, ctx, examples):
        self._take(ctx)
        return examples

    def after_training_exp(self, ctx) -> None:
        self._take(ctx)


def _run(stream, spec: str, train: dict) -> dict:
    """Train the stream with the tiny Llama; what must agree across ranks and with one process. Only naive is
    evaluated (``run_stream``), the others train through the same hooks without evaluation, to save time."""
    cfg = resolve_config(stream, spec, 0, train=train, eval=EVAL)
    set_seed(0)
    model, tok = tiny_llama()
    snap = Snapshot()
    plugins = build_strategy(cfg.strategy) + [snap]
    ctx = Context(model, tok, stream, cfg, plugins, random.Random(0))
    if spec == "naive":
        result = run_stream(ctx, progress=False)
    else:
        result = {"rows": None, "experiences": []}
        ctx.call("before_training")
        for ctx.experience, ctx.task in enumerate(stream.tasks):
            ctx.call("before_training_exp")
            result["experiences"].append(train_experience(ctx, progress=False))
            ctx.call("after_training_exp")
        ctx.call("after_training")
    named = {p.name: p for p in plugins}
    out = {"weights": snap.weights, "rows": result["rows"], "example_passes": ctx.example_passes,
           "loss_curves": [e["loss_curve"] for e in result["experiences"]],
           "tokens": [e["tokens"] for e in result["experiences"]]}
    if "ewc" in named:
        out["fisher"] = named["ewc"].fishers
    if "replay" in named:
        out["buffer"], out["replay_rng"] = named["replay"].buffer, named["replay"].rng.getstate()
    return out


def _worker(rank: int, port: int, tmp: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # a short timeout: a rank that stops joining collectives fails the test instead of hanging it
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=180))
    try:
        stream = load_stream(TINY_STREAM)
        res = {name: _run(stream, spec, train) for name, (spec, train) in SCENARIOS.items()}
        try:
            _run(stream, "sam(rho=0.1)", {"batch_size": 6, "grad_accum": 2})
        except UserError as e:
            res["batch_error"] = str(e)
        cfg = resolve_config(stream, "naive", 0, model=str(Path(tmp) / "model"), eval=EVAL)
        res["record"] = run_one(stream, cfg, Path(tmp) / f"rank{rank}", progress=False)
        res["failures"] = _failure_runs(rank, stream, tmp)
        torch.save(res, Path(tmp) / f"result{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Both ranks' results and the one-process references."""
    tmp = tmp_path_factory.mktemp("ddp")
    model, tok = tiny_llama()
    model.save_pretrained(tmp / "model")
    tok.save_pretrained(tmp / "model")
    mp.spawn(_worker, args=(_free_port(), str(tmp)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp / f"result{r}.pt", weights_only=False) for r in range(WORLD)]
    stream = load_stream(TINY_STREAM)
    ref = {name: _run(stream, spec, {**train, "grad_accum": 1}) for name, (spec, train) in SCENARIOS.items()}
    return ranks, ref


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert len(a) == len(b)
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


@pytest.mark.slow
@pytest.mark.parametrize("name", SCENARIOS)
def test_two_processes_equal_one_process(runs, name):
    (r0, r1), ref = runs[0], runs[1]
    a, b, one = r0[name], r1[name], ref[name]
    # bit-identical ranks before every step and after each experience (no broadcast hides a drift: the snapshots
    # after an experience are taken before the next experience's broadcast)
    assert len(a["weights"]) == 2 * (3 + 1)
    assert all(torch.equal(x, y) for x, y in zip(a["weights"], b["weights"]))
    assert a["loss_curves"] == b["loss_curves"]
    diff = _max_diff(a["weights"], one["weights"])
    print(f"\n{name}: max |w_ddp - w_single| = {diff:.3g}")
    assert diff < TOL
    assert _max_diff(a["weights"][1:2], one["weights"][:1]) > 1e-4  # the first step did move the weights
    for la, lo in zip(a["loss_curves"], one["loss_curves"]):
        assert la == pytest.approx(lo, rel=1e-5)
    assert a["tokens"] == one["tokens"] and a["example_passes"] == one["example_passes"]  # each rank took its share
    if name == "naive":
        assert len(a["rows"]) == 3 and b["rows"] == []  # rank 0 alone evaluates


@pytest.mark.slow
def test_ewc_fisher_identical_on_ranks_and_equal_to_one_process(runs):
    (r0, r1), ref = runs[0], runs[1]
    f0, f1, one = r0["sam+ewc"]["fisher"], r1["sam+ewc"]["fisher"], ref["sam+ewc"]["fisher"]
    assert len(f0) == len(one) == 1  # after experience 1 of 2 (none after the last: no later task uses it)
    for a, b, c in zip(f0, f1, one):
        assert all(torch.equal(a[n], b[n]) for n in a)
        assert max(float((a[n] - c[n]).abs().max()) for n in a) <= 1e-6 * max(float(c[n].abs().max()) for n in c)
        assert any(float(c[n].abs().max()) > 0 for n in c)


@pytest.mark.slow
def test_replay_buffer_identical_on_ranks_and_to_one_process(runs):
    (r0, r1), ref = runs[0], runs[1]
    a, b, one = r0["sam+replay, grad_accum 2"], r1["sam+replay, grad_accum 2"], ref["sam+replay, grad_accum 2"]
    assert len(a["buffer"]) == 16
    assert a["buffer"] == b["buffer"] == one["buffer"]
    assert a["replay_rng"] == b["replay_rng"] == one["replay_rng"]


@pytest.mark.slow
def test_batch_not_divisible_by_world_size_times_grad_accum_is_a_user_error(runs):
    for r in runs[0]:
        assert "batch_size 6 is not a multiple of world size 2 × grad_accum 2 = 4" in r["batch_error"]


@pytest.mark.slow
def test_only_rank_0_writes_the_record(runs):
    (r0, r1), ref = runs[0], runs[1]
    assert r0["record"].exists() and not r1["record"].exists()
    rec = read_record(r0["record"])
    assert rec.status == "complete" and len(rec.R) == 3
    assert rec.world_size == WORLD
    assert [e["tokens"] for e in rec.experiences] == ref["naive"]["tokens"]
    assert rec.cost["compute_multiplier"] == 1.0


def test_helpers_are_identities_in_one_process():
    assert not distributed.is_distributed() and distributed.world_size() == 1 and distributed.is_main()
    items = list(range(5))
    assert distributed.shard(items) == items
    distributed.check_batch(7, 1, 3)  # nothing to split: one process keeps its behaviour
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.full((2,), 3.0)
    loss = torch.tensor(1.5)
    assert distributed.average_gradients([p], loss) is loss and p.grad.tolist() == [3.0, 3.0]


def _train_first_task(stream, spec: str, train: dict) -> tuple[list[torch.Tensor], list[float]]:
    """Weights before each step and after the last, and the loss curve, of training the stream's first task."""
    cfg = resolve_config(stream, spec, 0, train=train)
    set_seed(0)
    model, tok = tiny_llama()
    snap = Snapshot()
    ctx = Context(model, tok, stream, cfg, build_strategy(cfg.strategy) + [snap], random.Random(0))
    ctx.experience, ctx.task = 0, stream.tasks[0]
    log = train_experience(ctx, progress=False)
    snap.after_training_exp(ctx)
    return snap.weights, log["loss_curve"]


def test_bf16_autocast_with_sam_stays_close_to_fp32(tiny_stream):
    fp32, fp32_loss = _train_first_task(tiny_stream, "sam(rho=0.1)", {})
    bf16, bf16_loss = _train_first_task(tiny_stream, "sam(rho=0.1)", {"precision": "bf16"})
    w0 = fp32[0]
    # ‖w_bf16 - w_fp32‖ / ‖w_fp32 - w_0‖ at every snapshot after the first step (an element-wise bound would be
    # loose: AdamW moves a weight with a tiny gradient by ~lr whatever its sign, and bf16 may flip that sign)
    rel = [float((b - f).norm() / (f - w0).norm()) for b, f in zip(bf16[1:], fp32[1:])]
    print(f"\nbf16 vs fp32: relative weight difference {max(rel):.3g} (largest over snapshots)")
    assert len(rel) == 3 and bf16[1].ne(fp32[1]).any()  # autocast did run the forward passes in bf16
    assert max(rel) < 0.2
    assert bf16_loss == pytest.approx(fp32_loss, rel=1e-3)


# --- a failure on one rank reaches every rank ------------------------------------------------------------------
def _failure_runs(rank: int, stream, tmp: str) -> dict:
    """Three runs in the process group: rank 0's evaluation after experience 1 diverges; rank 1 cannot load the
    model; then a run that succeeds (the ranks stayed in step). What each rank raised, and when."""
    import time

    from clsuite import engine, runner
    from clsuite.errors import DivergenceError
    cfg = resolve_config(stream, "naive", 0, model=str(Path(tmp) / "model"), eval=EVAL)
    real_evaluate, real_load = engine.evaluate, runner.load_model
    calls = []

    def evaluate(ctx, tasks, progress=False):
        calls.append(1)
        if len(calls) == 3:  # the tasks, after experience 1
            raise DivergenceError("injected: non-finite score after 1 experience(s)")
        return real_evaluate(ctx, tasks)

    def load_model(name):
        if rank == 1:
            raise RuntimeError("injected: rank 1 ran out of memory")
        return real_load(name)

    res = {}
    for name, module, attr, fake in (("rank 0 diverges", engine, "evaluate", evaluate),
                                     ("rank 1 fails", runner, "load_model", load_model),
                                     ("then a run succeeds", None, None, None)):
        if module is not None:
            setattr(module, attr, fake)
        try:
            path = run_one(stream, cfg, Path(tmp) / "failures" / name.replace(" ", "-"), progress=False)
            res[name] = ("ok", str(path), time.time())
        except Exception as e:
            res[name] = (type(e).__name__, str(e), time.time())
        finally:
            engine.evaluate, runner.load_model = real_evaluate, real_load
    return res


@pytest.mark.slow
def test_a_failure_on_one_rank_reaches_every_rank(runs):
    """Rank 0 diverging in its evaluation, or rank 1 failing, makes both ranks raise the same error at once (no
    rank left waiting at a collective: they would wait 3 min here, 2 h in clsuite); rank 0 writes the failed
    record, with the world size."""
    (rank0, rank1), _ = runs
    r0, r1 = rank0["failures"], rank1["failures"]
    for name in r0:
        print(f"\n{name}: rank 0 {r0[name][0]}, rank 1 {r1[name][0]}, {abs(r0[name][2] - r1[name][2]):.2f} s apart")
    diverged = "injected: non-finite score after 1 experience(s)"
    assert r0["rank 0 diverges"][:2] == r1["rank 0 diverges"][:2] == ("DivergenceError", diverged)
    failures = Path(rank0["record"]).parents[3] / "failures"
    record = read_record(failures / "rank-0-diverges" / "tiny-test" / "naive" / "seed0.json")
    assert (record.status, record.error, record.world_size) == ("failed", diverged, WORLD)
    assert r1["rank 1 fails"][:2] == ("RuntimeError", "injected: rank 1 ran out of memory")
    assert r0["rank 1 fails"][:2] == ("RankFailed", "rank 1 failed: RuntimeError: injected: rank 1 ran out of memory")
    assert not list((failures / "rank-1-fails").rglob("seed0.json"))  # not a property of the settings: no record
    assert r0["then a run succeeds"][0] == r1["then a run succeeds"][0] == "ok"
    assert read_record(r0["then a run succeeds"][1]).world_size == WORLD
    for name in ("rank 0 diverges", "rank 1 fails"):
        assert abs(r0[name][2] - r1[name][2]) < 10, name  # at once, not at the collective timeout
