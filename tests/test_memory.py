"""Memory: bf16 weights with an fp32 master copy, activation checkpointing, the peak in records, and the plan
(clsuite.memory, clsuite.plan; docs/memory.md)."""
from __future__ import annotations

import math
import random

import pytest
import torch

from clsuite.config import RunConfig, TrainConfig, resolve_config
from clsuite.data import lm_loss
from clsuite.engine import Context, set_seed, train_experience
from clsuite.errors import UserError
from clsuite.memory import MasterWeights, RunShape, State, TensorPeak, plan_memory, prepare_model, shape_of
from clsuite.strategy import STRATEGIES, Strategy, build_strategy

from conftest import tiny_llama


def _stepper(precision: str) -> tuple[torch.nn.Parameter, Context]:
    """A bf16 weight of 1.0 and a Context whose base_step runs AdamW at the paper's lr 5e-6 on it."""
    w = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    model = torch.nn.Module()
    model.w = w
    cfg = RunConfig(stream="s", train=TrainConfig(lr=5e-6, max_grad_norm=None, precision=precision))
    ctx = Context(model, None, None, cfg, [], random.Random(0))
    ctx.master = MasterWeights([w]) if precision == "bf16-weights" else None
    ctx.optimizer = torch.optim.AdamW([w], lr=5e-6, weight_decay=0.0)
    return w, ctx


def test_an_update_below_bf16_resolution_is_kept_by_the_fp32_master():
    kept, lost = _stepper("bf16-weights"), _stepper("fp32")
    for _ in range(500):
        for w, ctx in (kept, lost):
            w.grad = torch.ones_like(w)
            ctx.base_step()
            assert w.dtype == torch.bfloat16 and (w.grad is None) == (ctx.master is not None)
    (w_kept, ctx), (w_lost, _) = kept, lost
    master = ctx.master.pairs[0][1]
    assert master.dtype == torch.float32 and float(1 - master[0]) == pytest.approx(500 * 5e-6, rel=0.01)
    assert ctx.optimizer.state[w_kept]["exp_avg"].dtype == torch.float32  # the state is the master's
    assert torch.equal(w_kept, master.to(torch.bfloat16)) and (w_kept < 1).all()  # 1 - 2.5e-3 rounds to 0.99609375
    assert (w_lost == 1).all()  # bf16 alone: every one of the 500 updates rounded away


def test_bf16_weights_train_in_bf16_and_step_in_fp32(tiny_stream):
    cfg = resolve_config(tiny_stream, "sam", 0, train={"precision": "bf16-weights", "steps": 2})
    set_seed(0)
    model, tok = tiny_llama()
    prepare_model(model, cfg.train)
    rope = [b for n, b in model.named_buffers() if "inv_freq" in n]
    assert all(p.dtype == torch.bfloat16 for p in model.parameters()) and rope[0].dtype == torch.float32
    ctx = Context(model, tok, tiny_stream, cfg, build_strategy(cfg.strategy), random.Random(0))
    ctx.experience, ctx.task = 0, tiny_stream.tasks[0]
    before = [p.detach().clone() for p in model.parameters()]
    log = train_experience(ctx, progress=False)
    assert math.isfinite(log["final_loss"]) and ctx.master is None  # the master lives for one experience
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert all(s["exp_avg"].dtype == torch.float32 for s in ctx.optimizer.state.values())


def test_a_resumed_bf16_weights_run_equals_an_uninterrupted_one(tiny_stream, tmp_path, monkeypatch):
    from clsuite.runner import run_one
    from conftest import comparable, interrupt_after_first
    cfg = resolve_config(tiny_stream, "sam+ewc", 0, train={"precision": "bf16-weights", "steps": 2})
    ref = run_one(tiny_stream, cfg, tmp_path / "ref", progress=False)
    interrupt_after_first(monkeypatch, tiny_stream, cfg, tmp_path / "cut")  # the master lives for one experience
    assert comparable(run_one(tiny_stream, cfg, tmp_path / "cut", progress=False, resume=True)) == comparable(ref)


def test_sam_takes_its_norm_in_fp32_over_bf16_gradients():
    sam = STRATEGIES.get("sam")
    g = [torch.ones(3, dtype=torch.bfloat16)]  # ‖g‖ = sqrt(3) = 1.7320508..., which bf16 rounds to 1.734375
    norm = sam._global_norm(g)
    assert norm.dtype == torch.float32 and float(norm) == pytest.approx(math.sqrt(3), abs=1e-6)


def _grads(model, batch) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    lm_loss(model, batch).backward()
    return [p.grad.clone() for p in model.parameters()]


def test_activation_checkpointing_gives_the_same_gradients_with_less_memory(tiny_stream):
    model, tok = tiny_llama(hidden=32, layers=3)
    model.train()
    ctx = Context(model, tok, tiny_stream, resolve_config(tiny_stream, "naive", 0), [], random.Random(0))
    ctx.task = tiny_stream.tasks[0]
    batch = ctx.collate([tiny_stream.tasks[0].train[i] for i in range(16)])
    peaks, grads = [], []
    for checkpointing in (False, True):
        if checkpointing:
            prepare_model(model, TrainConfig(activation_checkpointing=True))
        tp = TensorPeak()
        tp.track(list(model.parameters()))
        with tp:
            grads.append(_grads(model, batch))
        peaks.append(tp.peak)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(*grads))
    assert peaks[1] < 0.8 * peaks[0]  # the layers' activations were not kept


def test_an_unsupported_model_refuses_activation_checkpointing():
    with pytest.raises(UserError, match="activation_checkpointing=true.*set it to false"):
        prepare_model(torch.nn.Linear(2, 2), TrainConfig(activation_checkpointing=True))


def test_new_settings_default_to_todays_behaviour_and_keep_fingerprints():
    from clsuite.fingerprint import config_digest
    train = TrainConfig()
    assert (train.precision, train.activation_checkpointing) == ("fp32", False)
    on = RunConfig(stream="s", train=TrainConfig(activation_checkpointing=True))
    assert "activation_checkpointing" not in on.model_dump()["train"]  # the same gradients: the same cell
    assert config_digest(on) == config_digest(RunConfig(stream="s"))
    assert config_digest(RunConfig(stream="s", train=TrainConfig(precision="bf16-weights"))) != config_digest(on)


# --- the peak in records -----------------------------------------------------------------------------------
def test_each_record_stores_the_training_peak_per_process(tiny_stream, tmp_path):
    from clsuite.records import read_record
    from clsuite.runner import run_one
    cfg = resolve_config(tiny_stream, "naive", 0, train={"steps": 1})
    rec = read_record(run_one(tiny_stream, cfg, tmp_path, progress=False))
    peaks = [e["peak_memory_bytes"] for e in rec.experiences]
    assert all(e["peak_memory"] in ("cpu_peak_rss", "cpu_peak_rss_since_start") for e in rec.experiences)
    assert all(len(p) == 1 and p[0] > 10 * 2**20 for p in peaks)  # one process; its RSS holds torch at least
    assert rec.cost["peak_memory_bytes"] == max(p[0] for p in peaks)


# --- the plan ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shape():
    model, _ = tiny_llama(hidden=32, layers=2)
    return shape_of(model, "tiny", "test")


def _line(plan, start: str):
    return next(x for x in plan.lines if x.component.startswith(start))


def test_the_plan_adds_each_strategys_declared_state(shape):
    train = TrainConfig(batch_size=8, max_length=32)
    n, b = shape.parameters, 4 * shape.parameters
    naive = plan_memory(shape, train, "naive", tasks=3)
    sam = plan_memory(shape, train, "sam+ewc", tasks=3)
    assert _line(naive, "weights").pass_bytes == b and _line(naive, "optimizer state").step_bytes == 2 * b
    assert _line(sam, "sam:").pass_bytes == b and _line(sam, "sam:").step_bytes == 0  # held in the pass only
    assert _line(sam, "ewc: Fisher").pass_bytes == 2 * b  # two finished tasks before the last
    # at the end of a backward pass: SAM's copy beside the complete gradient, no activations
    assert _line(sam, "sam:").end_bytes == b and _line(naive, "gradients").end_bytes == b
    assert sam.total("end") == sum(_line(sam, x).end_bytes for x in ("weights", "gradients", "optimizer state",
                                                                    "ewc: Fisher", "ewc: anchors", "sam:"))
    assert _line(sam, "activations").end_bytes == 0 and not shape.tied
    tied = shape_of(tiny_llama(hidden=32, layers=2, tie=True)[0], "tied", "test")
    assert _line(plan_memory(tied, train, "naive"), "tied embedding").end_bytes == 2 * 4 * tied.vocab * 32
    # pass: SAM's copy, two Fishers, two anchors, the penalty's two θ − θ* and its backward's two largest tensors;
    # step: the Fishers and anchors
    temps = 2 * 4 * shape.largest_tensor
    assert sam.total("pass") - naive.total("pass") == 7 * b + temps
    assert sam.total("step") - naive.total("step") == 4 * b
    wise = plan_memory(shape, train, "wiseft", tasks=3)
    assert _line(wise, "wiseft:").where == "host" and _line(wise, "wiseft:").pass_bytes == b
    lora = plan_memory(shape, train, "lora(r=2)")
    adapter = sum(2 * (i + o) for name, i, o in shape.linears if name.endswith(("q_proj", "v_proj")))
    assert _line(lora, "optimizer state").pass_bytes == 2 * 4 * adapter and adapter < n / 10
    assert _line(lora, "weights").pass_bytes == b  # the frozen base is still held
    assert _line(plan_memory(shape, train, "lora(r=2)+wiseft"), "wiseft:").component.endswith("nothing beyond "
                                                                                                "the model")
    replay = plan_memory(shape, train, "replay", tasks=3)
    assert _line(replay, "replay:").pass_bytes == 0 and not replay.unknown()


def test_fsdp_shards_what_follows_the_parameters_and_ddp_replicates_it(shape):
    train = TrainConfig(batch_size=8, max_length=32)
    ddp = plan_memory(shape, train, "sam+ewc", processes=4, parallel="ddp", tasks=2)
    fsdp = plan_memory(shape, train, "sam+ewc", processes=4, parallel="fsdp", tasks=2)
    for part in ("weights", "gradients", "optimizer state", "sam:", "ewc: Fisher"):
        assert _line(fsdp, part).step_bytes * 4 == pytest.approx(_line(ddp, part).step_bytes, rel=1e-6)
    assert _line(ddp, "activations").pass_bytes == _line(fsdp, "activations").pass_bytes  # 2 examples each
    assert _line(ddp, "all-reduce buffer").step_bytes > 0 and _line(fsdp, "FSDP gathered").pass_bytes > 0
    with pytest.raises(UserError, match="not a multiple of 3 processes"):
        plan_memory(shape, train, "naive", processes=3)
    bf16 = TrainConfig(batch_size=8, max_length=32, precision="bf16-weights")
    ddp = plan_memory(shape, bf16, "naive", processes=4)
    assert _line(ddp, "weights").pass_bytes == 2 * shape.parameters  # bf16, beside the fp32 master
    assert _line(ddp, "fp32 master copy").pass_bytes == 4 * shape.parameters
    for refused, spec in (("bf16-weights does not run under parallel=fsdp", "naive"),
                          ("'lwf' does not run under parallel=fsdp", "lwf")):
        with pytest.raises(UserError, match=refused):
            plan_memory(shape, bf16 if "bf16" in refused else train, spec, processes=4, parallel="fsdp")


def test_every_built_in_strategy_declares_its_state(shape):
    run = RunShape(shape, shape.parameters, 3, True, (), 2, 1, 16, 16)
    for name, cls in STRATEGIES.items():
        assert callable(getattr(cls, "memory_state", None)), name
        if cls.kind == "parametrization":
            assert callable(getattr(cls, "memory_trainable", None)), name
        states = build_strategy(name)[0].memory_state(run)
        assert all(isinstance(x, State) and x.elements >= 0 for x in states), name


class Undeclared(Strategy):
    kind = "loss"
    description = "a plugin that declares no memory_state"


def test_a_strategy_that_declares_nothing_is_an_unknown_line(shape):
    from clsuite.plan import fit_line
    STRATEGIES.register("_test_undeclared", Undeclared)
    try:
        plan = plan_memory(shape, TrainConfig(batch_size=8), "sam+_test_undeclared")
    finally:
        STRATEGIES._items.pop("_test_undeclared")
    line = _line(plan, "_test_undeclared:")
    assert line.pass_bytes is None and "declares no memory_state" in line.note and plan.unknown() == [line]
    assert "unknown" in fit_line(plan, 1000) and "no, even without" in fit_line(plan, 1e-9)


def test_the_plan_is_within_a_tenth_of_the_measured_peak_on_a_tiny_llama(tiny_stream):
    for spec, train in (("naive", {}), ("sam", {}), ("naive", {"precision": "bf16-weights"})):
        cfg = resolve_config(tiny_stream, spec, 0, train={"steps": 2, "batch_size": 16, **train})
        set_seed(0)
        model, tok = tiny_llama(hidden=64, layers=2)
        prepare_model(model, cfg.train)
        ctx = Context(model, tok, tiny_stream, cfg, build_strategy(cfg.strategy), random.Random(0))
        ctx.experience, ctx.task = 0, tiny_stream.tasks[0]
        widths = []
        collate = ctx.collate
        ctx.collate = lambda rows: widths.append(len((b := collate(rows))["input_ids"][0])) or b
        tp = TensorPeak()
        tp.track([*model.parameters(), *model.buffers()])
        with tp:
            train_experience(ctx, progress=False)
        plan = plan_memory(shape_of(model, "tiny", "test"), cfg.train, spec, tokens=max(widths), device="cpu")
        assert plan.peak() == pytest.approx(tp.peak, rel=0.1), (spec, train)  # measured: within 1.2%


def test_known_configs_plan_offline():
    from clsuite.memory import model_shape
    s7 = model_shape("NEU-HAI/Llama-2-7b-alpaca-cleaned")
    assert s7.source == "known config llama-2-7b" and round(s7.parameters / 1e6) == 6738
    assert round(model_shape("llama-2-13b").parameters / 1e6) == 13016


def test_plan_command(cli, tmp_path):
    code, out, err = cli("plan", "--model", "llama-2-7b", "--strategies", "naive,sam", "--processes", "8",
                         "--parallel", "fsdp", "--stream", "paper-platypus", "--set", "grad_accum=4",
                         "--device-gb", "80")
    assert code == 0, err
    assert out.count("peak per process on the device") == 2 and "fits 80 GiB: yes" in out
    assert "micro-batch 4 × 1024 tokens" in out and "sam: weights saved" in out
    code, out, _ = cli("plan", "--model", "llama-2-7b", "--processes", "1", "--stream", "paper-platypus",
                       "--device-gb", "80")
    assert code == 0 and "fits 80 GiB: no" in out
    for args, message in [
            (("--processes", "8", "--stream", "paper-platypus"), "not a multiple of 8 processes × grad_accum 32"),
            (("--parallel", "zero"), "--parallel 'zero': choose ddp or fsdp"),
            (("--processes", "0"), "--processes 0: give at least 1"),
            (("--device-gb", "-1"), "--device-gb -1.0: give the device's memory in GiB"),
            (("--strategies", "sma"), "sma"),
            (("--set", "precision=fp8"), "precision")]:
        code, _, err = cli("plan", "--model", "llama-2-7b", *args)
        assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, (args, err)
    empty = tmp_path / "empty-model"
    empty.mkdir()
    code, _, err = cli("plan", "--model", empty)
    assert code == 2 and "cannot read the config of model" in err and len(err.strip().splitlines()) == 1
