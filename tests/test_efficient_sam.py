"""The efficient SAM variants (looksam, sssam, aesam, msam) against their papers' formulas computed by hand on the toy
models of tests/test_sam.py, their limits (sssam p=1 is sam and p=0 naive, aesam with a huge c is naive, looksam
k=1 is sam), EWC's penalty at the perturbed weights, gradient accumulation, two processes against one, resume and
the cost they report."""
from __future__ import annotations

import copy
import importlib.util
import json
import math
import os
import random
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TINY_STREAM, tiny_llama
from test_sam import DT, MLP, gnorm, make_ctx, mlp_loss, sam_step

from clsuite.config import RunConfig, TrainConfig, resolve_config
from clsuite.engine import Context, train_experience
from clsuite.errors import UserError
from clsuite.records import read_record
from clsuite.runner import run_one
from clsuite.strategy import build_strategy
from clsuite.strategies.sssam import SSSAM


def grad(ws: list[torch.Tensor], fn=mlp_loss) -> list[torch.Tensor]:
    ws = [w.detach().clone().requires_grad_() for w in ws]
    return list(torch.autograd.grad(fn(*ws), ws))


def sam_grad(w: list[torch.Tensor], rho: float, fn=mlp_loss) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(g at w, g at w + rho g/‖g‖)."""
    g = grad(w, fn)
    return g, grad([wi + rho * gi / gnorm(g) for wi, gi in zip(w, g)], fn)


def weights(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def assert_weights(model, want: list[torch.Tensor], atol: float = 1e-6) -> None:
    for p, w in zip(model.parameters(), want):
        torch.testing.assert_close(p.detach(), w, atol=atol, rtol=0)


def run_steps(ctx: Context, n: int) -> list:
    """``n`` optimizer steps of the update rule on BATCH (ctx.step = 0 .. n-1); the weights after each."""
    out = []
    for ctx.step in range(n):
        sam_step(ctx)
        out.append(weights(ctx.model))
    return out


# --- LookSAM ---------------------------------------------------------------------------------------------------
def test_looksam_matches_hand_computation():
    rho, lr, alpha, k = 0.2, 0.3, 0.7, 2
    model = MLP(seed=2)
    ctx = make_ctx(model, f"looksam(rho={rho}, k={k}, alpha={alpha})", lr=lr)
    w = weights(model)
    got = run_steps(ctx, 3)

    g, gs = sam_grad(w, rho)  # step 0: SAM, and g_v = g_s - (g·g_s/‖g‖²) g
    c = sum((a * b).sum() for a, b in zip(g, gs)) / gnorm(g) ** 2
    gv = [b - c * a for a, b in zip(g, gs)]
    assert abs(float(sum((a * v).sum() for a, v in zip(g, gv)))) < 1e-12  # orthogonal to g
    w1 = [wi - lr * gi for wi, gi in zip(w, gs)]
    g1 = grad(w1)  # step 1: one pass, g + alpha ‖g‖/‖g_v‖ g_v
    w2 = [wi - lr * (gi + alpha * gnorm(g1) / gnorm(gv) * vi) for wi, gi, vi in zip(w1, g1, gv)]
    _, gs2 = sam_grad(w2, rho)  # step 2: SAM again (2 % k == 0)
    w3 = [wi - lr * gi for wi, gi in zip(w2, gs2)]
    for step, want in zip(got, [w1, w2, w3]):
        for a, b in zip(step, want):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    # the reuse step is neither plain SGD nor a repeat of step 0's direction
    plain = [wi - lr * gi for wi, gi in zip(w1, g1)]
    assert max(float((a - b).abs().max()) for a, b in zip(got[1], plain)) > 1e-4
    assert ctx.example_passes == 2 + 1 + 2
    looksam = ctx.plugins[0]
    assert looksam.cost_report() == {"sam_step_fraction": pytest.approx(2 / 3)}
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert looksam.extra_memory_bytes() == 2 * n_bytes  # the saved w and g during a SAM step
    looksam.after_training_exp(ctx)
    ctx.step = 1
    _, calls = sam_step(ctx)
    assert len(calls) == 2, "after an experience g_v is gone, so the next step is a SAM step"


def _zero_in_place(ctx: Context) -> None:
    """Make the engine's closure zero ``.grad`` in place instead of dropping it (as some training loops do)."""
    def zero_grad(set_to_none: bool = True) -> None:
        for p in ctx.trainable_parameters():
            if p.grad is not None:
                p.grad.zero_()
    ctx.optimizer.zero_grad = zero_grad


def test_looksam_keeps_g_when_the_closure_reuses_the_gradient_storage():
    """LookSAM keeps g by reference, not as a copy, so the pass at w + e must not write into g's storage: a closure
    that zeroes .grad in place gives the same steps, bit for bit, as the engine's, which drops .grad."""
    got = []
    for in_place in (False, True):
        ctx = make_ctx(MLP(seed=2), "looksam(rho=0.2, k=2, alpha=0.7)", lr=0.3)
        if in_place:
            _zero_in_place(ctx)
        got.append(run_steps(ctx, 3))
    for a, b in zip(*got):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


# --- SS-SAM ------------------------------------------------------------------------------------------------------
def test_sssam_takes_sam_steps_where_its_own_draws_say():
    rho, lr, p, n = 0.2, 0.3, 0.5, 8
    model = MLP(seed=4)
    ctx = make_ctx(model, f"sssam(rho={rho}, p={p})", lr=lr, steps=n)
    ctx.config = ctx.config.model_copy(update={"seed": 3})
    ctx.experience = 1
    decisions = [SSSAM.draw(3, 1, s) < p for s in range(n)]
    assert 0 < sum(decisions) < n, "the seed must give both kinds of step"
    w = weights(model)
    rng_states = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state(), ctx.rng.getstate())
    got = run_steps(ctx, n)
    assert random.getstate() == rng_states[0] and np.array_equal(np.random.get_state()[1], rng_states[1])
    assert torch.equal(torch.get_rng_state(), rng_states[2]) and ctx.rng.getstate() == rng_states[3]
    for step, sam in enumerate(decisions):
        g, gs = sam_grad(w, rho)
        w = [wi - lr * gi for wi, gi in zip(w, gs if sam else g)]
        for a, b in zip(got[step], w):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert ctx.example_passes == n + sum(decisions)
    assert ctx.plugins[0].cost_report()["sam_step_fraction"] == pytest.approx(sum(decisions) / n)


def test_sssam_draws_are_seeded_uniform_and_the_schedule_is_linear():
    draws = [SSSAM.draw(0, 0, s) for s in range(4000)]
    assert all(0 <= u < 1 for u in draws)
    assert abs(np.mean(np.array(draws) < 0.3) - 0.3) < 0.03
    assert draws[:50] == [SSSAM.draw(0, 0, s) for s in range(50)]  # a function of (seed, experience, step) only
    assert draws[:50] != [SSSAM.draw(0, 1, s) for s in range(50)] != [SSSAM.draw(1, 0, s) for s in range(50)]
    sssam = build_strategy("sssam(p=0.8, p_schedule=linear, p_min=0.2)")[0]
    assert [sssam.p_at(s, 4) for s in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert build_strategy("sssam(p=0.3)")[0].p_at(7, 10) == 0.3


# --- AE-SAM ------------------------------------------------------------------------------------------------------
def test_aesam_matches_hand_statistics_and_steps():
    rho, lr, c, delta, n = 0.2, 1.0, 0.5, 0.5, 6  # decisions T T F T T F; c·σ² in place of c·σ would differ
    model = MLP(seed=5)
    ctx = make_ctx(model, f"aesam(rho={rho}, c={c}, delta={delta})", lr=lr, steps=n)
    w = weights(model)
    taken, got = [], []
    for ctx.step in range(n):
        taken.append(len(sam_step(ctx)[1]) == 2)
        got.append(weights(model))
    mean = var = 0.0
    decisions = []
    for step in range(n):
        g, gs = sam_grad(w, rho)
        sq = float(gnorm(g)) ** 2
        mean = delta * mean + (1 - delta) * sq
        var = delta * var + (1 - delta) * (sq - mean) ** 2
        decisions.append(sq > mean + c * math.sqrt(var))
        w = [wi - lr * gi for wi, gi in zip(w, gs if decisions[-1] else g)]
        for a, b in zip(got[step], w):  # lr = 1 amplifies the float32 rounding of the engine's loss
            torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    assert taken == decisions
    assert 0 < sum(decisions) < n, "the settings must give both kinds of step"
    aesam = ctx.plugins[0]
    assert aesam.mean == pytest.approx(mean, rel=1e-4) and aesam.var == pytest.approx(var, rel=1e-4)
    assert ctx.example_passes == n + sum(decisions)
    assert aesam.cost_report()["sam_step_fraction"] == pytest.approx(sum(decisions) / n)
    sched = build_strategy("aesam(c=1, c_schedule=linear, c_end=-1)")[0]
    assert [sched.c_at(s, 5) for s in range(5)] == pytest.approx([1, 0.5, 0, -0.5, -1])


# --- MSAM --------------------------------------------------------------------------------------------------------
def test_msam_matches_hand_computation_with_sgd_momentum():
    rho, lr, mu = 0.3, 0.2, 0.9
    model = MLP(seed=6)
    ctx = make_ctx(model, f"msam(rho={rho})", lr=lr)
    ctx.optimizer = torch.optim.SGD(ctx.trainable_parameters(), lr=lr, momentum=mu)
    w = weights(model)
    losses, got = [], []
    for ctx.step in range(3):
        loss, calls = sam_step(ctx)
        assert len(calls) == 1  # one pass per step
        losses.append(float(loss))
        got.append(weights(model))
    g0 = grad(w)  # step 0: no momentum yet, a plain step; the buffer starts as g0
    w1, buf = [wi - lr * gi for wi, gi in zip(w, g0)], g0
    want, want_losses = [w1], [float(mlp_loss(*w))]
    for _ in range(2):  # e = -rho m/‖m‖, gradient at w + e, buf <- mu buf + g, w <- w - lr buf
        wp = [wi - rho * bi / gnorm(buf) for wi, bi in zip(want[-1], buf)]
        want_losses.append(float(mlp_loss(*wp)))
        buf = [mu * bi + gi for bi, gi in zip(buf, grad(wp))]
        want.append([wi - lr * bi for wi, bi in zip(want[-1], buf)])
    for a, b in zip(got, want):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, atol=1e-6, rtol=0)
    assert losses == pytest.approx(want_losses, abs=1e-6)  # the loss reported is the one at w + e
    assert ctx.example_passes == 3
    assert ctx.plugins[0].cost_report() == {"sam_step_fraction": pytest.approx(2 / 3)}


def test_msam_perturbs_along_adamw_exp_avg():
    rho, lr, wd = 0.4, 0.01, 0.1
    model = MLP(seed=7)
    ctx = make_ctx(model, f"msam(rho={rho})")
    ctx.optimizer = torch.optim.AdamW(ctx.trainable_parameters(), lr=lr, weight_decay=wd)
    ref = [p.detach().clone().requires_grad_() for p in model.parameters()]  # AdamW by hand-fed gradients
    ref_opt = torch.optim.AdamW(ref, lr=lr, weight_decay=wd)
    for ctx.step in range(3):
        m = [ref_opt.state[r]["exp_avg"].clone() for r in ref] if ctx.step else None
        w = [r.detach().clone() for r in ref]
        _, calls = sam_step(ctx)
        assert len(calls) == 1
        at = w if m is None else [wi - rho * mi / gnorm(m) for wi, mi in zip(w, m)]
        for x, y in zip(calls[0], at):  # the pass is at w - rho m/‖m‖ (at w on the first step)
            torch.testing.assert_close(x, y, atol=1e-6, rtol=0)
        for r, gi in zip(ref, grad(at)):
            r.grad = gi
        ref_opt.step()
        assert_weights(model, [r.detach() for r in ref])  # w restored, then AdamW's step


def test_msam_refuses_an_optimizer_without_momentum():
    ctx = make_ctx(MLP(), "msam")  # make_ctx's SGD has no momentum, as clsuite's SGD never does
    with pytest.raises(UserError, match="optimizer=AdamW") as e:
        sam_step(ctx)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("spec", ["looksam(rho=0.7)", "sssam(rho=0.7, p=1)", "aesam(rho=0.7, c=-1e6)", "msam(rho=0.7)"])
def test_perturbed_steps_restore_the_weights_bit_for_bit(spec):
    model = MLP(seed=3, dtype=torch.float32)
    w0 = weights(model)
    ctx = make_ctx(model, spec, lr=0.0)
    ctx.optimizer = torch.optim.SGD(ctx.trainable_parameters(), lr=0.0, momentum=0.9)  # msam needs a momentum
    perturbed = []
    for ctx.step in range(2):
        _, calls = sam_step(ctx)
        perturbed += [any(not torch.equal(a, b) for a, b in zip(c, w0)) for c in calls]
        for p, w in zip(model.parameters(), w0):
            assert torch.equal(p.detach(), w)
    assert any(perturbed)


# --- through the engine: limits, gradient accumulation, EWC, resume, the record's cost -----------------------------
def _stream(tasks: int = 1):
    from datasets import Dataset

    from clsuite.streams import Stream, Task
    rows = [Dataset.from_dict({"prompt": ["12+3=", "rev abcde:", "7+8=", "rev xyz:"],
                               "target": ["15", "edcba", "15", "zyx"]}),
            Dataset.from_dict({"prompt": ["sort 3142:", "9+9=", "sort 21:", "rev ab:"],
                               "target": ["1234", "18", "12", "ba"]})]
    return Stream("unit", [Task(f"t{i}", rows[i], rows[i], "exact_match") for i in range(tasks)], [], "none")


def _ctx(model, tok, spec: str, stream, grad_accum: int = 1, steps: int = 4, optimizer: str = "SGD",
         lr: float = 0.5) -> Context:
    cfg = RunConfig(stream="unit", strategy=spec, seed=0,
                    train=TrainConfig(optimizer=optimizer, lr=lr, steps=steps, batch_size=4, grad_accum=grad_accum,
                                      max_length=32))
    return Context(model, tok, stream, cfg, build_strategy(spec), random.Random(0))


def _train(ctx: Context, experiences) -> Context:
    for ctx.experience in experiences:
        ctx.task = ctx.stream.tasks[ctx.experience]
        ctx.call("before_training_exp")
        train_experience(ctx, progress=False)
        ctx.call("after_training_exp")
    return ctx


def _state(ctx: Context) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in ctx.model.state_dict().items()}


@pytest.fixture(scope="module")
def lm():
    return tiny_llama()


@pytest.mark.parametrize("variant, same_as", [("sssam(rho=0.5, p=1)", "sam(rho=0.5)"), ("sssam(rho=0.5, p=0)", "naive"),
                                              ("aesam(rho=0.5, c=1e9)", "naive"),
                                              ("looksam(rho=0.5, k=1)", "sam(rho=0.5)")])
def test_limits_equal_sam_or_naive_bit_for_bit(variant, same_as, lm):
    model, tok = lm
    runs = {s: _train(_ctx(copy.deepcopy(model), tok, s, _stream()), [0]) for s in (variant, same_as)}
    a, b = _state(runs[variant]), _state(runs[same_as])
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert runs[variant].example_passes == runs[same_as].example_passes
    fraction = runs[variant].plugins[0].cost_report()["sam_step_fraction"]
    assert fraction == (1.0 if same_as.startswith("sam") else 0.0)
    if same_as == "naive":  # and SAM would have changed the weights
        s = _state(_train(_ctx(copy.deepcopy(model), tok, "sam(rho=0.5)", _stream()), [0]))
        assert max(float((s[n] - a[n]).abs().max()) for n in a) > 1e-4


# each with both kinds of step in 4 steps; msam needs a momentum, and clsuite's SGD has none
SPECS = {"looksam(rho=0.5, k=2)": "SGD", "sssam(rho=0.5)": "SGD", "aesam(rho=0.5, c=0.5, delta=0.5)": "SGD",
         "msam(rho=0.5)": "AdamW"}


@pytest.mark.parametrize("spec", list(SPECS))
def test_grad_accumulation_gives_the_same_weights(spec, lm):
    model, tok = lm
    lr = 0.5 if SPECS[spec] == "SGD" else 0.01
    one, two = (_train(_ctx(copy.deepcopy(model), tok, spec, _stream(), ga, optimizer=SPECS[spec], lr=lr), [0])
                for ga in (1, 2))
    a, b = _state(one), _state(two)
    # AdamW moves an element whose gradient is ~0 by up to lr: float noise of the summation order shows there (naive
    # AdamW differs by 7e-6 here), while a perturbation from one micro-batch only would differ by ~1e-3
    atol = 1e-6 if SPECS[spec] == "SGD" else 5e-5
    for n in a:
        torch.testing.assert_close(b[n], a[n], atol=atol, rtol=0, msg=n)
    assert one.plugins[0].cost_report() == two.plugins[0].cost_report()
    assert 0 < one.plugins[0].cost_report()["sam_step_fraction"] < 1


@pytest.mark.parametrize("spec", list(SPECS))
def test_resume_from_state_dict_continues_exactly(spec, lm):
    model, tok = lm
    lr = 0.5 if SPECS[spec] == "SGD" else 0.01
    make = lambda m: _ctx(m, tok, spec, _stream(2), optimizer=SPECS[spec], lr=lr)  # noqa: E731
    whole = _train(make(copy.deepcopy(model)), [0, 1])
    first = _train(make(copy.deepcopy(model)), [0])
    state = json.loads(json.dumps(first.plugins[0].state_dict()))  # JSON values only: what a checkpoint keeps
    resumed = make(copy.deepcopy(first.model))
    resumed.plugins[0].load_state_dict(state)
    _train(resumed, [1])
    a, b = _state(whole), _state(resumed)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert resumed.plugins[0].state_dict() == whole.plugins[0].state_dict()
    assert whole.plugins[0].cost_report() == resumed.plugins[0].cost_report()
    if spec.startswith("aesam"):  # its statistics carry over, and they matter
        assert whole.plugins[0].mean > 0 and state["mean"] > 0


def _ewc_ctx(spec: str, lam: float, lr: float) -> tuple[Context, list, list]:
    model = MLP(seed=1)
    ctx = make_ctx(model, f"{spec}+ewc(lambda={lam})", lr=lr)
    ctx.optimizer = torch.optim.SGD(ctx.trainable_parameters(), lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(7)
    fisher = {"W1": torch.rand(3, 4, generator=g, dtype=DT) * 2, "w2": torch.rand(4, generator=g, dtype=DT) * 2}
    anchor = {n: p.detach() + 0.5 * torch.randn(p.shape, generator=g, dtype=DT) for n, p in model.named_parameters()}
    ctx.plugins[0].load_state_dict({"mode": "separate", "experiences": [0], "fisher": [fisher], "anchor": [anchor]})
    return ctx, [fisher["W1"], fisher["w2"]], [anchor["W1"], anchor["w2"]]


@pytest.mark.parametrize("spec, step", [("looksam(rho=0.2, k=2)", 0), ("looksam(rho=0.2, k=2)", 1),
                                        ("sssam(rho=0.2, p=1)", 0), ("aesam(rho=0.2, c=-1e6)", 0),
                                        ("msam(rho=0.2)", 1)])
def test_ewc_penalty_is_evaluated_where_the_gradient_is_taken(spec, step):
    lam, rho, alpha, lr = 3.0, 0.2, 0.7, 0.1
    ctx, F, A = _ewc_ctx(spec, lam, lr)
    seen, base_step = [], ctx.base_step

    def capture() -> None:
        seen.append([p.grad.detach().clone() for p in ctx.trainable_parameters()])
        base_step()

    ctx.base_step = capture
    for ctx.step in range(step):
        sam_step(ctx)
    w = weights(ctx.model)
    buf = [ctx.optimizer.state[p]["momentum_buffer"].clone() for p in ctx.trainable_parameters()] if step else []
    ctx.step = step
    sam_step(ctx)

    def full(ws):  # ∇(task + (λ/2) Σ F (w − θ*)²)
        return [gt + lam * f * (wi - a) for gt, f, wi, a in zip(grad(ws), F, ws, A)]

    if spec.startswith("msam"):
        want = full([wi - rho * b / gnorm(buf) for wi, b in zip(w, buf)])
    elif step == 0:
        g = full(w)
        want = full([wi + rho * gi / gnorm(g) for wi, gi in zip(w, g)])
    else:  # looksam's reuse step: the penalty at w, plus step 0's g_v (also from penalised gradients)
        ctx0, _, _ = _ewc_ctx(spec, lam, lr)
        w0 = weights(ctx0.model)
        g0 = full(w0)
        gs0 = full([wi + rho * gi / gnorm(g0) for wi, gi in zip(w0, g0)])
        c = sum((a * b).sum() for a, b in zip(g0, gs0)) / gnorm(g0) ** 2
        gv = [b - c * a for a, b in zip(g0, gs0)]
        g = full(w)
        want = [gi + alpha * gnorm(g) / gnorm(gv) * vi for gi, vi in zip(g, gv)]
    for got, x in zip(seen[-1], want):
        torch.testing.assert_close(got, x, atol=1e-6, rtol=0)
    task_only = grad(w)
    assert max(float((s - t).abs().max()) for s, t in zip(seen[-1], task_only)) > 0.1  # the penalty matters


def test_record_reports_the_share_of_sam_steps(tiny_stream, tmp_path):
    cfg = resolve_config(tiny_stream, "looksam(k=2)", 0, train={"steps": 3}, eval={"max_examples": 2})
    rec = read_record(run_one(tiny_stream, cfg, tmp_path, progress=False))
    assert rec.cost["sam_step_fraction"] == pytest.approx(4 / 6)  # steps 0 and 2 of each of two experiences
    assert rec.cost["compute_multiplier"] == pytest.approx(10 / 6)


def test_bad_parameters_are_user_errors():
    for spec in ["looksam(k=0)", "looksam(alpha=-1)", "sssam(p=1.5)", "sssam(p=0.2, p_schedule=linear, p_min=0.5)",
                 "sssam(p_schedule=cosine)", "aesam(delta=1)", "aesam(delta=0)", "aesam(c_schedule=step)",
                 "msam(rho=0)", "msam(adaptive=true)", "msam(rho=0.1, schedule=linear, rho_min=0.2)",
                 "looksam+sam", "msam+sssam"]:
        with pytest.raises(UserError) as e:
            build_strategy(spec)
        assert "\n" not in str(e.value)


# --- data parallelism: 2 gloo processes against one, as tests/test_distributed.py does for sam ---------------------
DDP_SPECS = ["looksam(rho=0.1, k=2)", "sssam(rho=0.1)", "aesam(rho=0.1, delta=0.5, c=0.5)", "msam(rho=0.3)"]


def _ddp_worker(rank: int, port: int, tmp: str) -> None:
    from test_distributed import WORLD, _run

    from clsuite.streams import load_stream
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=180))
    try:
        stream = load_stream(TINY_STREAM)
        torch.save({s: _run(stream, s, {}) for s in DDP_SPECS}, Path(tmp) / f"result{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_processes_equal_one_process(tmp_path):
    import torch.multiprocessing as mp
    from test_distributed import TOL, WORLD, _free_port, _max_diff, _run

    from clsuite.streams import load_stream
    mp.spawn(_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    r0, r1 = (torch.load(tmp_path / f"result{r}.pt", weights_only=True) for r in range(WORLD))
    stream = load_stream(TINY_STREAM)
    for spec in DDP_SPECS:
        one = _run(stream, spec, {})
        assert all(torch.equal(x, y) for x, y in zip(r0[spec]["weights"], r1[spec]["weights"])), spec
        assert _max_diff(r0[spec]["weights"], one["weights"]) < TOL, spec
        # the count is of the global batch on every rank: equal counts are the same SAM/plain decisions
        assert r0[spec]["example_passes"] == one["example_passes"] == r1[spec]["example_passes"], spec


# --- perf/efficient_sam.py: the harness behind docs/efficient-sam.md's figures -------------------------------------
def _perf_harness():
    path = Path(__file__).parents[1] / "perf" / "efficient_sam.py"
    spec = importlib.util.spec_from_file_location("perf_efficient_sam", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kept_reduction_its_interval_and_the_step_cost():
    h = _perf_harness()
    assert h.kept_reduction(0.30, 0.10, 0.15) == pytest.approx(0.75)
    assert h.kept_reduction(0.30, 0.10, 0.30) == 0 and h.kept_reduction(0.30, 0.10, 0.10) == 1
    assert h.kept_reduction(0.30, 0.10, 0.40) == pytest.approx(-0.5)  # sharper than naive
    assert math.isnan(h.kept_reduction(0.2, 0.2, 0.1))
    lo, hi = h.kept_interval([0.3, 0.5, 0.4], [0.1, 0.3, 0.2], [0.2, 0.4, 0.3])  # half of SAM's on every seed
    assert (lo, hi) == pytest.approx((0.5, 0.5))
    assert h.kept_interval([0.3, 0.5], [0.1, 0.3], [0.3, 0.3]) == pytest.approx((0.0, 1.0))  # kept 0, then 1
    naive = {"sam_fraction": 0.0, "plain_step": 2.0, "sam_step": None}
    run = {"sam_fraction": 0.25, "plain_step": 2.2, "sam_step": 4.0}
    assert h.step_cost(run, naive) == pytest.approx(0.75 * 1.1 + 0.25 * 2.0)
    assert h.step_cost({"sam_fraction": 1.0, "plain_step": None, "sam_step": 4.0}, naive) == pytest.approx(2.0)


def test_harness_trains_every_task_and_reports_cost_and_kept_reduction(tiny_stream, lm):
    h = _perf_harness()
    model, tok = lm
    before = _state(model)
    specs = ["naive", "sam", "looksam(k=2)"]
    runs = [h.train_stream(model, tok, tiny_stream, s, seed, 4) for seed in (0, 1) for s in specs]
    assert all(torch.equal(a, b) for a, b in zip(before.values(), _state(model).values()))  # trained on copies
    by = {(r["spec"], r["seed"]): r for r in runs}
    for spec, passes in zip(specs, (1.0, 2.0, 1.5)):  # looksam(k=2): SAM at steps 0 and 2 of each 4-step task
        r = by[(spec, 0)]
        assert r["steps"] == 8 and r["passes"] == pytest.approx(passes)
        assert r["sam_fraction"] == pytest.approx(passes - 1)
        assert len(r["worst_by_experience"]) == 2 and r["worst"] == r["worst_by_experience"][-1]
        assert all(math.isfinite(w) for w in r["worst_by_experience"] + r["loss_by_experience"])
        assert (r["plain_step"] is None) == (spec == "sam") and (r["sam_step"] is None) == (spec == "naive")
    again = h.train_stream(model, tok, tiny_stream, "sam", 1, 4)
    assert again["worst_by_experience"] == by[("sam", 1)]["worst_by_experience"]  # same seed, same weights
    assert by[("naive", 0)]["worst"] != by[("naive", 1)]["worst"]  # the seed orders the data
    summary = {r["spec"]: r for r in h.summarize(runs, specs)}
    assert summary["sam"]["kept"] == [1.0, 1.0] and summary["naive"]["kept"] == [0.0, 0.0]
    assert summary["looksam(k=2)"]["kept_of_means"] == pytest.approx(h.kept_reduction(
        *(np.mean([by[(s, k)]["worst"] for k in (0, 1)]) for s in ("naive", "sam", "looksam(k=2)"))))
    assert summary["sam"]["passes"] == [2.0, 2.0] and summary["naive"]["time"] == [1.0, 1.0]
    assert len(h.table(list(summary.values())).splitlines()) == 2 + len(specs)


def _result(seed: int, worst: dict[str, float]) -> dict:
    runs = [{"spec": s, "seed": seed, "seconds": 2.0 * (1 + f), "steps": 2, "passes": 1 + f, "sam_fraction": f,
             "plain_step": 1.0 if f < 1 else None, "sam_step": 2.0 if f > 0 else None, "worst": w, "loss": 0.1,
             "worst_by_experience": [w], "loss_by_experience": [0.1]}
            for (s, w), f in zip(worst.items(), (0.0, 1.0, 0.2))]
    return {"stream": "unit", "seeds": [seed], "threads": 1, "steps": 2, "tasks": 1, "batch_size": 4,
            "sharpness_examples": 8, "load": [1.0, 2.0], "command": f"efficient_sam.py --seeds {seed}", "runs": runs}


def test_merged_report_gives_the_verdict_of_each_variant(capsys):
    h = _perf_harness()
    h.report([_result(0, {"naive": 0.3, "sam": 0.1, "v": 0.12}), _result(1, {"naive": 0.5, "sam": 0.3, "v": 0.4})])
    out = capsys.readouterr().out
    assert "seeds 0,1" in out and out.count("command:") == 2
    assert "misses: v (cost 1.20x, kept 0.70)" in out  # kept of the means: (0.4 - 0.26) / (0.4 - 0.2)
    h.report([_result(0, {"naive": 0.3, "sam": 0.1, "v": 0.12})])
    assert "meets: v (cost 1.20x, kept 0.90)" in capsys.readouterr().out
    second = _result(0, {"naive": 0.3, "sam": 0.1, "v": 0.12})  # a second job at the same seed: the first is kept
    for run in second["runs"]:
        run["plain_step"] = run["plain_step"] and 2 * run["plain_step"]  # a slower job, whose runs are dropped
        run["sam_step"] = run["sam_step"] and 2 * run["sam_step"]
    second["runs"][2]["worst_by_experience"] = [0.2]
    h.report([_result(0, {"naive": 0.3, "sam": 0.1, "v": 0.12}), second])
    out = capsys.readouterr().out
    assert "naive at seed 0 is in two jobs: same sharpness" in out and "v at seed 0 is in two jobs: DIFFERENT" in out
    assert "meets: v (cost 1.20x, kept 0.90)" in out
    with pytest.raises(SystemExit, match="every strategy needs every seed"):
        bad = _result(1, {"naive": 0.5, "sam": 0.3, "v": 0.4})
        bad["runs"] = bad["runs"][:2]
        h.report([_result(0, {"naive": 0.3, "sam": 0.1, "v": 0.12}), bad])
