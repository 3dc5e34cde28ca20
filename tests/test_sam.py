"""SAM/ASAM against hand computations: the update, the global norm, ASAM's scaling, the exact restore, two passes
per step, EWC's penalty in the second pass, and gradient accumulation through the real engine loop. Every step
runs the engine's own closure (``clsuite.engine.make_closure``) on toy models whose language-model loss is a known
function of their weights."""
from __future__ import annotations

import copy
import random
from types import SimpleNamespace

from conftest import tiny_llama
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clsuite.config import RunConfig, TrainConfig
from clsuite.engine import Context, make_closure, train_experience
from clsuite.errors import UserError
from clsuite.strategy import build_strategy

DT = torch.float64
X = torch.tensor([[0.3, -1.2, 0.8], [1.1, 0.4, -0.5], [-0.7, 0.9, 0.2], [0.5, 0.5, 1.5]], dtype=DT)
Y = torch.tensor([0.4, -0.3, 0.9, 0.1], dtype=DT)


# One sequence of two tokens whose second is the only target: the engine's lm_loss of a ToyLM on it is softplus(z).
BATCH = {"input_ids": torch.zeros(1, 2, dtype=torch.long), "attention_mask": torch.ones(1, 2, dtype=torch.long),
         "labels": torch.tensor([[-100, 1]])}


class ToyLM(nn.Module):
    """A causal-LM stand-in: logits [z, 0] at every position with z = ``self.z()``, so the cross-entropy of target
    token 1 is softplus(z), a known function of the weights."""

    def z(self) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs) -> SimpleNamespace:
        z = self.z()
        return SimpleNamespace(logits=torch.stack([z, torch.zeros_like(z)]).expand(*input_ids.shape, 2))


def mlp_z(W1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    return ((torch.tanh(X.to(W1.dtype) @ W1) @ w2 - Y.to(W1.dtype)) ** 2).mean()


def mlp_loss(W1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """MLP's training objective: a non-quadratic function of two parameter tensors (so ∇L(w + e) ≠ ∇L(w) + H e
    exactly)."""
    return F.softplus(mlp_z(W1, w2))


class MLP(ToyLM):
    def __init__(self, seed: int = 0, dtype: torch.dtype = DT):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W1 = nn.Parameter(torch.randn(3, 4, generator=g, dtype=dtype))
        self.w2 = nn.Parameter(torch.randn(4, generator=g, dtype=dtype))

    def z(self) -> torch.Tensor:
        return mlp_z(self.W1, self.w2)


class Linear2(ToyLM):
    """z = 1000·(c1·a) + 0.001·(c2·b): gradients s·1000·c1 and s·0.001·c2 (s = sigmoid(z), about 1/2 here, the
    same factor for both) whose per-tensor norms differ by ~10⁶. SAM's perturbation does not depend on s."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor([0.5, -2.0, -1.75], dtype=DT))  # c1·a = 0: z near 0, s not saturated
        self.b = nn.Parameter(torch.tensor([3.0, -0.02], dtype=DT))
        self.c1 = torch.tensor([1.0, 2.0, -2.0], dtype=DT)
        self.c2 = torch.tensor([-3.0, 4.0], dtype=DT)

    def z(self) -> torch.Tensor:
        return 1000 * self.c1 @ self.a + 1e-3 * self.c2 @ self.b


def make_ctx(model: nn.Module, spec: str, lr: float = 0.1, steps: int = 10, step: int = 0) -> Context:
    plugins = build_strategy(spec)
    cfg = RunConfig(stream="unit", strategy=spec,
                    train=TrainConfig(optimizer="SGD", lr=1.0, steps=steps, max_grad_norm=None))
    ctx = Context(model, None, None, cfg, plugins, random.Random(0))
    ctx.optimizer = torch.optim.SGD(ctx.trainable_parameters(), lr=lr)  # lr=0 allowed here (not in TrainConfig)
    ctx.step, ctx.total_steps = step, steps  # as train_experience sets them
    return ctx


def sam_step(ctx: Context) -> tuple[torch.Tensor, list]:
    """One optimizer step of the update rule on the engine's closure over BATCH; also the weights at each pass."""
    update = next(p for p in ctx.plugins if p.kind == "update")
    closure = make_closure(ctx, [BATCH], [{"prompt": "", "target": ""}], ctx.trainable_parameters())
    calls: list = []

    def recorded() -> torch.Tensor:
        calls.append([p.detach().clone() for p in ctx.trainable_parameters()])
        return closure()

    loss = update.optimizer_step(ctx, recorded)
    return loss, calls


def perturbation(calls: list) -> list[torch.Tensor]:
    """e = (weights at the second pass) − (weights at the first)."""
    return [b - a for a, b in zip(calls[0], calls[1])]


def gnorm(ts) -> torch.Tensor:
    return torch.sqrt(sum((t ** 2).sum() for t in ts))


# --- (a) the update ---------------------------------------------------------------------------------------
def test_one_sam_step_matches_hand_computation():
    model = MLP()
    w0 = [p.detach().clone() for p in model.parameters()]
    rho, lr = 0.2, 0.3
    ctx = make_ctx(model, f"sam(rho={rho})", lr=lr)
    loss, calls = sam_step(ctx)

    w = [t.clone().requires_grad_() for t in w0]
    g = torch.autograd.grad(mlp_loss(*w), w)
    e = [rho * gi / gnorm(g) for gi in g]
    wp = [(wi + ei).detach().requires_grad_() for wi, ei in zip(w0, e)]
    g_sam = torch.autograd.grad(mlp_loss(*wp), wp)
    expected = [wi - lr * gi for wi, gi in zip(w0, g_sam)]

    for p, want in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), want, atol=1e-6, rtol=0)
    # the step is SAM's, not plain SGD's, and the loss reported is the one at w
    plain = [wi - lr * gi for wi, gi in zip(w0, g)]
    assert max(float((p.detach() - q).abs().max()) for p, q in zip(model.parameters(), plain)) > 1e-3
    assert float(loss) == pytest.approx(float(mlp_loss(*w0)), abs=1e-6)  # the engine sums the loss in float32
    assert ctx.example_passes == 2  # one example, two passes


# --- (b) global norm --------------------------------------------------------------------------------------
def test_perturbation_uses_global_norm_over_all_tensors():
    model = Linear2()
    rho = 0.05
    ctx = make_ctx(model, f"sam(rho={rho})", lr=0.0)
    _, calls = sam_step(ctx)
    ea, eb = perturbation(calls)
    ga, gb = 1000 * model.c1, 1e-3 * model.c2
    g_global = gnorm([ga, gb])
    torch.testing.assert_close(ea, rho * ga / g_global, atol=1e-12, rtol=0)
    torch.testing.assert_close(eb, rho * gb / g_global, atol=1e-15, rtol=0)
    torch.testing.assert_close(gnorm([ea, eb]), torch.tensor(rho, dtype=DT), atol=1e-12, rtol=0)
    # a per-tensor norm would have moved b by rho; the global one moves it by ~rho·1e-6
    assert float(gnorm([eb])) < 1e-5 * rho


# --- (c) ASAM ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec,rho,eta", [("asam", 0.5, 0.01), ("sam(adaptive=true, rho=0.3, eta=0.1)", 0.3, 0.1)])
def test_asam_scaling(spec: str, rho: float, eta: float):
    model = Linear2()
    w0 = [p.detach().clone() for p in model.parameters()]
    ctx = make_ctx(model, spec, lr=0.0)
    assert ctx.plugins[0].params.adaptive and ctx.plugins[0].params.rho == rho
    _, calls = sam_step(ctx)
    g = [1000 * model.c1, 1e-3 * model.c2]
    T = [w.abs() + eta for w in w0]
    norm = gnorm([t * gi for t, gi in zip(T, g)])
    for got, t, gi in zip(perturbation(calls), T, g):
        torch.testing.assert_close(got, rho * t ** 2 * gi / norm, atol=1e-12, rtol=0)


def test_linear_rho_schedule():
    steps = 11
    for step, want in [(0, 0.4), (5, 0.25), (10, 0.1)]:
        ctx = make_ctx(Linear2(), "sam(rho=0.4, schedule=linear, rho_min=0.1)", lr=0.0, steps=steps, step=step)
        _, calls = sam_step(ctx)
        assert float(gnorm(perturbation(calls))) == pytest.approx(want, abs=1e-12)


def test_bad_parameters_and_two_update_rules_are_user_errors():
    for spec in ["sam(rho=0)", "sam(rho=-1)", "sam(schedule=cosine)", "sam(rho=0.1, schedule=linear, rho_min=0.2)",
                 "sam(eta=-1)", "sam(foo=1)", "sam+asam"]:
        with pytest.raises(UserError):
            build_strategy(spec)
    assert build_strategy("sam")[0].params.adaptive is False
    assert [p.name for p in build_strategy("asam")] == ["asam"]


# --- (d) exact restore; (e) two passes --------------------------------------------------------------------
def test_weights_restored_bit_for_bit_and_two_closure_calls():
    model = MLP(seed=3, dtype=torch.float32)
    w0 = [p.detach().clone() for p in model.parameters()]
    ctx = make_ctx(model, "sam(rho=0.7)", lr=0.0)
    _, calls = sam_step(ctx)
    assert len(calls) == 2
    for p, w in zip(model.parameters(), w0):
        assert torch.equal(p.detach(), w)
    # the test can tell: subtracting e would not have restored these weights exactly
    e = perturbation(calls)
    assert any(not torch.equal((w + ei) - ei, w) for w, ei in zip(w0, e))


def test_non_finite_gradient_stops_without_touching_weights():
    class Bad(ToyLM):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.tensor([0.0, 1.0], dtype=DT))

        def z(self):
            return self.w.sqrt().sum()  # d/dw sqrt(w) at 0 is inf

    model = Bad()
    ctx = make_ctx(model, "sam", lr=0.1)
    loss, calls = sam_step(ctx)
    assert not torch.isfinite(loss) and len(calls) == 1
    assert torch.equal(model.w.detach(), torch.tensor([0.0, 1.0], dtype=DT))


# --- (f) SAM + EWC: the penalty is in the second pass -----------------------------------------------------
def test_sam_with_ewc_second_pass_includes_penalty():
    lam, rho, lr = 3.0, 0.2, 0.1
    model = MLP(seed=1)
    ctx = make_ctx(model, f"sam(rho={rho})+ewc(lambda={lam})", lr=lr)
    assert [p.name for p in ctx.plugins] == ["ewc", "sam"]
    ewc = ctx.plugins[0]
    g = torch.Generator().manual_seed(7)
    fisher = {"W1": torch.rand(3, 4, generator=g, dtype=DT) * 2, "w2": torch.rand(4, generator=g, dtype=DT) * 2}
    anchor = {n: p.detach() + 0.5 * torch.randn(p.shape, generator=g, dtype=DT) for n, p in model.named_parameters()}
    ewc.load_state_dict({"mode": "separate", "experiences": [0], "fisher": [fisher], "anchor": [anchor]})

    seen: list = []
    base_step = ctx.base_step

    def capture() -> None:
        seen.append([p.grad.detach().clone() for p in ctx.trainable_parameters()])
        base_step()

    ctx.base_step = capture
    w0 = [p.detach().clone() for p in model.parameters()]
    sam_step(ctx)

    F, A = [fisher["W1"], fisher["w2"]], [anchor["W1"], anchor["w2"]]

    def task_grad(ws):
        ws = [t.detach().clone().requires_grad_() for t in ws]
        return torch.autograd.grad(mlp_loss(*ws), ws)

    def full_grad(ws):  # ∇(task + (λ/2) Σ F (w − θ*)²) = ∇task + λ F (w − θ*)
        return [gt + lam * f * (w - a) for gt, f, w, a in zip(task_grad(ws), F, ws, A)]

    g = full_grad(w0)
    e = [rho * gi / gnorm(g) for gi in g]
    wp = [w + ei for w, ei in zip(w0, e)]
    expected = full_grad(wp)
    assert len(seen) == 1
    for got, want in zip(seen[0], expected):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    # the penalty matters: the task gradient alone is far from what the optimizer got
    assert max(float((s - t).abs().max()) for s, t in zip(seen[0], task_grad(wp))) > 0.1
    for p, w, gs in zip(model.parameters(), w0, expected):
        torch.testing.assert_close(p.detach(), w - lr * gs, atol=1e-6, rtol=0)


# --- (g) gradient accumulation through the engine ---------------------------------------------------------
def _tiny_lm():
    return tiny_llama()


def _train(model, tok, spec: str, grad_accum: int, steps: int = 3) -> Context:
    from datasets import Dataset

    from clsuite.streams import Stream, Task
    rows = Dataset.from_dict({"prompt": ["12+3=", "rev abcde:"], "target": ["15", "edcba"]})  # different lengths
    task = Task("unit", rows, rows, "exact_match")
    stream = Stream("unit", [task], [], "none")
    cfg = RunConfig(stream="unit", strategy=spec, seed=0,
                    train=TrainConfig(optimizer="SGD", lr=0.5, steps=steps, batch_size=4, grad_accum=grad_accum,
                                      max_length=32))
    ctx = Context(model, tok, stream, cfg, build_strategy(spec), random.Random(0))
    ctx.experience, ctx.task = 0, task
    train_experience(ctx, progress=False)
    return ctx


@pytest.mark.slow
def test_grad_accumulation_gives_same_weights_through_engine():
    model, tok = _tiny_lm()
    runs = {}
    for spec, ga in [("sam(rho=0.5)", 1), ("sam(rho=0.5)", 2), ("naive", 2)]:
        runs[spec, ga] = _train(copy.deepcopy(model), tok, spec, ga)
    one, two = runs["sam(rho=0.5)", 1].model.state_dict(), runs["sam(rho=0.5)", 2].model.state_dict()
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=1e-6, rtol=0, msg=name)
    naive = runs["naive", 2].model.state_dict()
    assert max(float((naive[n] - one[n]).abs().max()) for n in one) > 1e-4  # SAM did change the update
    # two closure calls per step, two examples per batch: the compute multiplier is honest
    assert runs["sam(rho=0.5)", 2].example_passes == 2 * 3 * 2
    assert runs["naive", 2].example_passes == 3 * 2
