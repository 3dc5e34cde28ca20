"""EWC against hand computations: the Fisher of a logistic model (closed-form per-example gradients), the
quadratic penalty, separate and online modes, name matching, state, parameters, and a real tiny Llama."""
from __future__ import annotations

import random
import warnings

from conftest import tiny_llama
import pytest
import torch
import torch.nn.functional as Fn
from datasets import Dataset
from torch import nn

from clsuite.config import RunConfig
from clsuite.engine import Context
from clsuite.errors import UserError
from clsuite.strategy import build_strategy
from clsuite.streams import Task

DT = torch.float64


class Logistic(nn.Module):
    """p(y=1|x) = σ(w·x + b), plus a frozen tensor EWC must ignore."""

    def __init__(self, w=(0.3, -0.8, 0.5), b=0.1):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w, dtype=DT))
        self.b = nn.Parameter(torch.tensor(b, dtype=DT))
        self.frozen = nn.Parameter(torch.ones(2, dtype=DT), requires_grad=False)


def parse(rows) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.tensor([[float(v) for v in r["prompt"].split()] for r in rows], dtype=DT)
    y = torch.tensor([float(r["target"]) for r in rows], dtype=DT)
    return x, y


class LogisticContext(Context):
    """A real Context whose task loss is the logistic NLL (the engine's is an LM's)."""

    def loss(self, examples, reduction="mean"):
        x, y = parse(examples)
        nll = Fn.binary_cross_entropy_with_logits(x @ self.model.w + self.model.b, y, reduction="none")
        return nll if reduction == "none" else nll.mean()


ROWS = [{"prompt": "1 2 -1", "target": "1"}, {"prompt": "0.5 -1 2", "target": "0"},
        {"prompt": "-2 0 1", "target": "1"}]
ROWS_B = [{"prompt": "0 1 1", "target": "0"}, {"prompt": "2 -1 0.5", "target": "1"},
          {"prompt": "1 1 1", "target": "0"}]


def make(spec: str = "ewc", rows=ROWS, model: nn.Module | None = None) -> LogisticContext:
    plugins = build_strategy(spec)
    data = Dataset.from_list(rows)
    ctx = LogisticContext(model or Logistic(), None, None, RunConfig(stream="unit", strategy=spec, seed=0),
                          plugins, random.Random(0))
    ctx.experience, ctx.task = 0, Task("logit", data, data, "exact_match")
    return ctx


def hand_fisher(model: Logistic, rows) -> dict[str, torch.Tensor]:
    """∂(−log p(y|x))/∂w = (σ(z) − y) x and ∂/∂b = σ(z) − y, squared and averaged over the rows."""
    x, y = parse(rows)
    r = torch.sigmoid(x @ model.w.detach() + model.b.detach()) - y
    return {"w": ((r[:, None] * x) ** 2).mean(0), "b": (r ** 2).mean()}


def finish(ctx: Context, experience: int, rows=None) -> None:
    """End an experience: what the engine does after training (``after_training_exp``)."""
    ctx.experience = experience
    if rows is not None:
        data = Dataset.from_list(rows)
        ctx.task = Task(f"logit{experience}", data, data, "exact_match")
    ctx.call("after_training_exp")


def move(model: nn.Module, seed: int, scale: float = 0.7) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def by_hand(lam: float, fisher: dict, anchor: dict, model: nn.Module) -> torch.Tensor:
    params = dict(model.named_parameters())
    return lam / 2 * sum((fisher[n] * (params[n].detach() - anchor[n]) ** 2).sum() for n in fisher)


# --- the Fisher -------------------------------------------------------------------------------------------
def test_fisher_is_mean_of_squared_per_example_gradients():
    ctx = make("ewc(samples=64)")
    ewc = ctx.plugins[0]
    ctx.model.train()
    finish(ctx, 0)
    want = hand_fisher(ctx.model, ROWS)
    assert set(ewc.fishers[0]) == {"w", "b"}  # frozen parameters are not consolidated
    for n in want:
        torch.testing.assert_close(ewc.fishers[0][n], want[n], atol=1e-12, rtol=0)
        torch.testing.assert_close(ewc.anchors[0][n], dict(ctx.model.named_parameters())[n].detach(), atol=0, rtol=0)
    assert ctx.example_passes == 3  # three extra forward+backward passes, counted
    assert ctx.model.training  # mode restored
    assert all(p.grad is None for p in ctx.model.parameters())  # the Fisher leaves .grad alone
    anchor_w = ewc.anchors[0]["w"].clone()
    move(ctx.model, 1)
    assert torch.equal(ewc.anchors[0]["w"], anchor_w)  # the anchor is a copy


def test_fisher_subsamples_seeded_rows():
    ctx = make("ewc(samples=2)")
    ewc = ctx.plugins[0]
    finish(ctx, 0)
    idx = ewc.sample_indices(3, seed=0, experience=0)
    assert len(idx) == 2 and len(set(idx)) == 2 and idx == ewc.sample_indices(3, seed=0, experience=0)
    assert ctx.example_passes == 2
    want = hand_fisher(ctx.model, [ROWS[i] for i in idx])
    torch.testing.assert_close(ewc.fishers[0]["w"], want["w"], atol=1e-12, rtol=0)


# --- the penalty ------------------------------------------------------------------------------------------
def test_penalty_zero_at_anchor_quadratic_and_by_hand():
    lam = 7.0
    ctx = make(f"ewc(lambda={lam})")
    ewc = ctx.plugins[0]
    assert ewc.before_backward(ctx) is None  # nothing stored before the first experience ends
    finish(ctx, 0)
    assert float(ewc.before_backward(ctx).detach()) == 0.0  # exactly zero at the anchor
    anchor = {n: t.clone() for n, t in ewc.anchors[0].items()}
    d = {"w": torch.tensor([0.4, -0.2, 0.9], dtype=DT), "b": torch.tensor(-0.3, dtype=DT)}

    def at(t: float) -> torch.Tensor:
        with torch.no_grad():
            for n, p in ctx.model.named_parameters():
                if n in d:
                    p.copy_(anchor[n] + t * d[n])
        return ewc.before_backward(ctx)

    p1 = at(1.0)
    hand = lam / 2 * sum((ewc.fishers[0][n] * d[n] ** 2).sum() for n in d)
    torch.testing.assert_close(p1.detach(), hand, atol=1e-12, rtol=0)
    for t in (0.5, -2.0, 3.0):
        torch.testing.assert_close(at(t).detach(), t ** 2 * p1.detach(), atol=1e-12, rtol=1e-12)
    # its gradient is λ F (θ − θ*)
    ctx.model.zero_grad()
    at(1.0).backward()
    for n, p in ctx.model.named_parameters():
        if n in d:
            torch.testing.assert_close(p.grad, lam * ewc.fishers[0][n] * d[n], atol=1e-12, rtol=0)


def test_separate_mode_keeps_one_entry_per_task():
    lam = 2.0
    ctx = make(f"ewc(lambda={lam})")
    ewc = ctx.plugins[0]
    fishers, anchors = [], []
    for t, rows in enumerate([ROWS, ROWS_B, ROWS]):
        move(ctx.model, 10 + t)
        fishers.append(hand_fisher(ctx.model, rows))
        anchors.append({n: p.detach().clone() for n, p in ctx.model.named_parameters() if p.requires_grad})
        finish(ctx, t, rows)
    assert len(ewc.fishers) == len(ewc.anchors) == 3 and ewc.experiences == [0, 1, 2]
    for got, want in zip(ewc.fishers, fishers):
        for n in want:
            torch.testing.assert_close(got[n], want[n], atol=1e-12, rtol=0)
    move(ctx.model, 99)
    want = sum(by_hand(lam, f, a, ctx.model) for f, a in zip(fishers, anchors))
    torch.testing.assert_close(ewc.before_backward(ctx).detach(), want, atol=1e-12, rtol=0)
    n_trainable = 4  # w (3) + b (1); float64 here: 8 bytes each, Fisher and anchor, per task
    assert ewc.extra_memory_bytes() == 3 * 2 * n_trainable * 8
    assert ctx.example_passes == 9


def test_online_mode_decays_fisher_and_keeps_latest_anchor():
    lam, gamma = 4.0, 0.5
    ctx = make(f"ewc(lambda={lam}, mode=online, gamma={gamma})")
    ewc = ctx.plugins[0]
    f1 = hand_fisher(ctx.model, ROWS)
    finish(ctx, 0)
    move(ctx.model, 5)
    f2 = hand_fisher(ctx.model, ROWS_B)
    latest = {n: p.detach().clone() for n, p in ctx.model.named_parameters() if p.requires_grad}
    finish(ctx, 1, ROWS_B)
    assert len(ewc.fishers) == len(ewc.anchors) == 1 and ewc.experiences == [1]
    want = {n: gamma * f1[n] + f2[n] for n in f1}
    for n in want:
        torch.testing.assert_close(ewc.fishers[0][n], want[n], atol=1e-12, rtol=0)
        torch.testing.assert_close(ewc.anchors[0][n], latest[n], atol=0, rtol=0)
    move(ctx.model, 6)
    torch.testing.assert_close(ewc.before_backward(ctx).detach(), by_hand(lam, want, latest, ctx.model),
                               atol=1e-12, rtol=0)
    assert ewc.extra_memory_bytes() == 2 * 4 * 8


def test_missing_or_reshaped_names_are_skipped():
    lam = 3.0
    ctx = make(f"ewc(lambda={lam})")
    ewc = ctx.plugins[0]
    fisher = {"w": torch.tensor([1.0, 2.0, 3.0], dtype=DT), "b": torch.ones(2, dtype=DT),  # b: wrong shape
              "gone": torch.ones(1, dtype=DT), "frozen": torch.ones(2, dtype=DT)}       # absent; not trainable
    anchor = {n: torch.zeros_like(f) for n, f in fisher.items()}
    ewc.load_state_dict({"mode": "separate", "fisher": [fisher], "anchor": [anchor]})
    want = lam / 2 * (fisher["w"] * ctx.model.w.detach() ** 2).sum()
    torch.testing.assert_close(ewc.before_backward(ctx).detach(), want, atol=1e-12, rtol=0)
    # nothing matches at all: no penalty, one warning
    ewc.load_state_dict({"mode": "separate", "fisher": [{"gone": fisher["gone"]}], "anchor": [{"gone": anchor["gone"]}]})
    with pytest.warns(RuntimeWarning, match="no stored parameter"):
        assert ewc.before_backward(ctx) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ewc.before_backward(ctx) is None


def test_state_dict_round_trip():
    ctx = make("ewc(lambda=5)")
    finish(ctx, 0)
    move(ctx.model, 3)
    state = ctx.plugins[0].state_dict()
    assert state["mode"] == "separate" and state["experiences"] == [0] and set(state["fisher"][0]) == {"w", "b"}
    fresh = build_strategy("ewc(lambda=5)")[0]
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.before_backward(ctx), ctx.plugins[0].before_backward(ctx), atol=0, rtol=0)
    with pytest.raises(ValueError, match="mode"):
        build_strategy("ewc(mode=online)")[0].load_state_dict(state)


# --- parameters -------------------------------------------------------------------------------------------
def test_lambda_alias_and_bad_values():
    (ewc,) = build_strategy("ewc(lambda=5)")
    assert ewc.params.lam == 5.0 and "lambda=5.0" in repr(ewc)
    assert build_strategy("ewc(lam=5)")[0].params.lam == 5.0
    p = build_strategy("ewc")[0].params
    assert (p.lam, p.samples, p.mode, p.gamma) == (100.0, 64, "separate", 1.0)
    for spec in ["ewc(lambda=-1)", "ewc(mode=foo)", "ewc(samples=0)", "ewc(gamma=1.5)", "ewc(gamma=-0.1)",
                 "ewc(alpha=1)"]:
        with pytest.raises(UserError):
            build_strategy(spec)


# --- on a real (tiny) Llama through Context.loss ---------------------------------------------------------
@pytest.mark.slow
def test_fisher_on_tiny_llama_matches_per_example_autograd():
    from clsuite.data import collate, lm_loss
    from clsuite.streams import Stream
    model, tok = tiny_llama()
    model.train()
    rows = [{"prompt": "12+3=", "target": "15"}, {"prompt": "rev abc:", "target": "cba"},
            {"prompt": "copy xy:", "target": "xy"}]
    data = Dataset.from_list(rows)
    task = Task("unit", data, data, "exact_match")
    plugins = build_strategy("ewc(samples=2)")
    ctx = Context(model, tok, Stream("unit", [task, task], [], "none"), RunConfig(stream="unit", strategy="ewc"),
                  plugins, random.Random(0))
    ctx.experience, ctx.task = 0, task
    ctx.call("after_training_exp")
    ewc = plugins[0]
    trainable = dict((n, p) for n, p in model.named_parameters() if p.requires_grad)
    assert set(ewc.fishers[0]) == set(trainable) and ctx.example_passes == 2
    chosen = [rows[i] for i in ewc.sample_indices(3, 0, 0)]
    names = list(trainable)
    want = {n: torch.zeros_like(p) for n, p in trainable.items()}
    for r in chosen:
        grads = torch.autograd.grad(lm_loss(model, collate(tok, [r], False, 128)), list(trainable.values()))
        for n, g in zip(names, grads):
            want[n] += g ** 2 / len(chosen)
    for n in names:
        torch.testing.assert_close(ewc.fishers[0][n], want[n], atol=1e-7, rtol=1e-5, msg=n)
    assert sum(float(f.sum()) for f in ewc.fishers[0].values()) > 0
    assert ewc.extra_memory_bytes() == 2 * 4 * sum(p.numel() for p in trainable.values())


def test_no_fisher_after_the_last_experience_and_a_general_fisher_before_the_first():
    from clsuite.streams import Stream
    model, tok = tiny_llama()
    general = Dataset.from_list([{"prompt": f"copy {c}:", "target": c} for c in "abcdef"])
    task = Task("unit", general, general, "exact_match")
    plugins = build_strategy("ewc(general=4)")
    stream = Stream("unit", [task], [], "none", general=general)
    ctx = Context(model, tok, stream, RunConfig(stream="unit", strategy="ewc(general=4)"), plugins, random.Random(0))
    ewc = plugins[0]
    ctx.call("before_training")
    assert ewc.experiences == [-1] and ctx.example_passes == 4  # anchored at the initial weights
    torch.testing.assert_close(ewc.anchors[0]["model.embed_tokens.weight"], model.model.embed_tokens.weight)
    ctx.experience, ctx.task = 0, task
    ctx.call("after_training_exp")
    assert ewc.experiences == [-1] and ctx.example_passes == 4  # the last task's Fisher would protect nothing
    with pytest.raises(UserError, match="needs general data"):
        build_strategy("ewc(general=4)")[0].before_training(
            Context(model, tok, Stream("unit", [task], [], "none"), ctx.config, plugins, random.Random(0)))
