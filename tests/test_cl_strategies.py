"""LwF, A-GEM, MAS, SI and L2-SP against hand computations on toy models through the engine's own closure and
``Context.base_step`` (A-GEM's projection with and without SAM, LwF's term in both SAM passes), the ``before_update``
hook, resume of a composed run, and cross-checks against avalanche-lib 0.6.0's plugins."""
from __future__ import annotations

import copy
import random
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clsuite.config import RunConfig, TrainConfig, resolve_config
from clsuite.data import collate
from clsuite.engine import Context, make_closure
from clsuite.runner import run_one
from clsuite.strategies.agem import project
from clsuite.strategies.lwf import at_targets
from clsuite.strategies.mas import output_sq_norm
from clsuite.strategy import KINDS, STACKING, Strategy, build_strategy

from conftest import TINY_STREAM, comparable, interrupt_after_first, tiny_llama

DT = torch.float64


class Toy(nn.Module):
    """A causal-LM stand-in with two output classes: at each position, logits [c_k·w, 0] for input token k, so the
    cross-entropy of target token 1 after token k is softplus(c_k·w) and its gradient sigmoid(c_k·w)·c_k."""

    def __init__(self, w: list[float], c: list[list[float]]):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w, dtype=DT))
        self.register_buffer("c", torch.tensor(c, dtype=DT))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs) -> SimpleNamespace:
        z = self.c[input_ids] @ self.w
        return SimpleNamespace(logits=torch.stack([z, torch.zeros_like(z)], -1))


def toy_batch(ids: list[int]) -> dict[str, torch.Tensor]:
    """One two-token sequence per id; the second token (1) is the only target."""
    n = len(ids)
    return {"input_ids": torch.tensor([[k, 0] for k in ids]), "attention_mask": torch.ones(n, 2, dtype=torch.long),
            "labels": torch.tensor([[-100, 1]] * n)}


def toy_ctx(model: nn.Module, spec: str, lr: float = 0.5, grad_accum: int = 1) -> Context:
    cfg = RunConfig(stream="unit", strategy=spec, seed=0,
                    train=TrainConfig(optimizer="SGD", lr=lr, steps=10, max_grad_norm=None, batch_size=2,
                                      grad_accum=grad_accum))
    ctx = Context(model, None, None, cfg, build_strategy(spec), random.Random(0))
    ctx.optimizer = torch.optim.SGD(ctx.trainable_parameters(), lr=lr)
    ctx.step, ctx.total_steps, ctx.experience = 0, 10, 1
    ctx.collate = lambda rows: toy_batch([r["id"] for r in rows])  # rows name their token
    return ctx


def step(ctx: Context, batch: dict, n: int = 1) -> list[list[torch.Tensor]]:
    """One optimizer step on ``batch`` through the engine's closure and update rule; the weights at each pass."""
    update = next((p for p in ctx.plugins if p.kind == "update"), None)
    closure = make_closure(ctx, [batch], [{}] * n, ctx.trainable_parameters())
    calls: list = []

    def recorded() -> torch.Tensor:
        calls.append([p.detach().clone() for p in ctx.trainable_parameters()])
        return closure()

    if update is None:
        recorded()
        ctx.base_step()
    else:
        update.optimizer_step(ctx, recorded)
    return calls


def sp(x: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(x)


# --- the kind and the hook ----------------------------------------------------------------------------------
def test_gradient_kind_sits_between_loss_and_update():
    assert KINDS.index("loss") < KINDS.index("gradient") < KINDS.index("update") and "gradient" in STACKING
    assert [p.name for p in build_strategy("sam+agem+ewc")] == ["ewc", "agem", "sam"]


def test_before_update_runs_in_base_step_before_clipping():
    """Every plugin's before_update sees the unclipped gradient, and the step uses what it leaves."""
    model = Toy([0.3, -0.2], [[1.0, 2.0]])
    ctx = toy_ctx(model, "naive", lr=1.0)
    ctx.config = ctx.config.model_copy(update={"train": ctx.config.train.model_copy(update={"max_grad_norm": 1e-3})})
    seen = []

    class Doubler(Strategy):
        def before_update(self, c):
            seen.append(model.w.grad.clone())
            model.w.grad.mul_(2)

    ctx.plugins = [Doubler()]
    w0 = model.w.detach().clone()
    step(ctx, toy_batch([0]))
    g = sp(torch.tensor(-0.1, dtype=DT)) * torch.tensor([1.0, 2.0], dtype=DT)
    torch.testing.assert_close(seen[0], g)  # not clipped yet
    torch.testing.assert_close(model.w.detach(), w0 - 1e-3 * g / g.norm())  # 2g clipped to norm 1e-3


# --- A-GEM ----------------------------------------------------------------------------------------------------
def test_agem_projection_by_hand():
    g, r = [torch.tensor([1.0, 0.0])], [torch.tensor([-1.0, 1.0])]
    assert project(g, r)  # g·r = -1: g - (-1/2) r
    torch.testing.assert_close(g[0], torch.tensor([0.5, 0.5]))
    assert float(g[0] @ r[0]) == 0.0
    g = [torch.tensor([1.0, 1.0])]
    assert not project(g, [torch.tensor([1.0, 0.0])])  # g·r = 1 >= 0: untouched
    torch.testing.assert_close(g[0], torch.tensor([1.0, 1.0]))
    g = [torch.tensor([1.0, 1.0])]
    assert not project(g, [torch.tensor([1.0, -1.0])])  # g·r = 0: untouched
    # the dot products are global: per tensor +1 and -3, together -2 < 0, ‖r‖² = 2, so g + r
    g, r = [torch.tensor([1.0]), torch.tensor([-3.0])], [torch.tensor([1.0]), torch.tensor([1.0])]
    assert project(g, r)
    torch.testing.assert_close(torch.cat(g), torch.tensor([2.0, -2.0]))


C = [[1.0, 0.2], [-1.0, 0.5]]  # token 0: the current task; token 1: the memory; c0·c1 < 0, so their gradients conflict


def _agem_ctx(spec: str, memory_token: int, lr: float = 0.5) -> Context:
    ctx = toy_ctx(Toy([0.4, -0.3], C), spec, lr=lr)
    agem = next(p for p in ctx.plugins if p.name == "agem")
    agem.buffer = [{"prompt": "", "target": "", "id": memory_token, "_task": "old"}] * 3
    return ctx


def _project_by_hand(g: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    d = float(g @ r)
    return g - d / float(r @ r) * r if d < 0 else g


@pytest.mark.parametrize("memory_token", [1, 0], ids=["conflicting-projected", "agreeing-untouched"])
def test_agem_step_by_hand(memory_token):
    lr = 0.5
    ctx = _agem_ctx("agem(sample=2)", memory_token, lr)
    w = ctx.model.w.detach().clone()
    passes = ctx.example_passes
    step(ctx, toy_batch([0]))
    c0, cm = torch.tensor(C[0], dtype=DT), torch.tensor(C[memory_token], dtype=DT)
    g, r = sp(c0 @ w) * c0, sp(cm @ w) * cm
    assert (float(g @ r) < 0) == (memory_token == 1)
    torch.testing.assert_close(ctx.model.w.detach(), w - lr * _project_by_hand(g, r))
    assert ctx.example_passes - passes == 1 + 2  # the step's example and the two memory examples
    agem = ctx.plugins[0]
    assert agem.cost_report() == {"agem_projected_fraction": float(memory_token == 1)}


def test_agem_with_sam_projects_the_sam_gradient():
    """The projected gradient is g_sam = ∇L(w + e), against g_ref at the restored w; the step uses it."""
    lr, rho = 0.5, 0.3
    ctx = _agem_ctx(f"sam(rho={rho})+agem(sample=2)", 1, lr)
    w = ctx.model.w.detach().clone()
    calls = step(ctx, toy_batch([0]))
    c0, c1 = torch.tensor(C[0], dtype=DT), torch.tensor(C[1], dtype=DT)
    g = sp(c0 @ w) * c0
    e = rho * g / g.norm()
    torch.testing.assert_close(calls[1][0], w + e)  # SAM's second pass at w + e
    g_sam, r = sp(c0 @ (w + e)) * c0, sp(c1 @ w) * c1
    assert float(g_sam @ r) < 0
    torch.testing.assert_close(ctx.model.w.detach(), w - lr * _project_by_hand(g_sam, r))


def test_agem_memory_is_a_seeded_reservoir_and_its_batches_are_seeded():
    ctx = SimpleNamespace(task=SimpleNamespace(name="t0", train=[{"prompt": str(i), "target": "x"} for i in range(50)]),
                          config=SimpleNamespace(seed=3), experience=0)
    a, b = build_strategy("agem(size=10)")[0], build_strategy("agem(size=10)")[0]
    a.after_training_exp(ctx)
    b.after_training_exp(ctx)
    assert len(a.buffer) == 10 and a.buffer == b.buffer and a.seen == 50
    assert a.memory_batch(3, 1, 5) == b.memory_batch(3, 1, 5) != a.memory_batch(3, 1, 6)
    assert all("_task" not in r for r in a.memory_batch(3, 1, 5))
    empty = build_strategy("agem")[0]
    ctx2 = _agem_ctx("agem", 1)
    ctx2.plugins = [empty]  # nothing in memory (the first experience): no reference gradient, no projection
    w = ctx2.model.w.detach().clone()
    step(ctx2, toy_batch([0]))
    torch.testing.assert_close(ctx2.model.w.detach(), w - 0.5 * sp(torch.tensor(C[0], dtype=DT) @ w)
                               * torch.tensor(C[0], dtype=DT))


# --- L2-SP ----------------------------------------------------------------------------------------------------
def test_l2sp_penalty_and_gradient_by_hand():
    alpha, lr = 0.4, 0.5
    ctx = toy_ctx(Toy([1.0, 2.0], [[1.0, 0.0]]), f"l2sp(alpha={alpha})", lr=lr)
    l2sp = ctx.plugins[0]
    l2sp.before_training(ctx)  # θ₀ = [1, 2]
    with torch.no_grad():
        ctx.model.w.copy_(torch.tensor([1.5, 1.0], dtype=DT))
    assert float(l2sp.penalty(ctx.model).detach()) == pytest.approx(alpha / 2 * (0.5 ** 2 + 1.0 ** 2))
    w = ctx.model.w.detach().clone()
    step(ctx, toy_batch([0]))
    g = sp(torch.tensor(1.5, dtype=DT)) * torch.tensor([1.0, 0.0], dtype=DT) + alpha * (w - torch.tensor([1.0, 2.0],
                                                                                                           dtype=DT))
    torch.testing.assert_close(ctx.model.w.detach(), w - lr * g)
    assert l2sp.extra_memory_bytes() == 2 * 8
    fresh = build_strategy(f"l2sp(alpha={alpha})")[0]
    fresh.load_state_dict(l2sp.state_dict())
    assert float(fresh.penalty(ctx.model).detach()) == float(l2sp.penalty(ctx.model).detach())


# --- MAS --------------------------------------------------------------------------------------------------------
class Bilinear(nn.Module):
    """Logits X[token] @ Wᵀ at every position (X fixed features, W trainable): ‖F‖² = ‖W x‖², gradient 2 (W x) xᵀ."""

    def __init__(self):
        super().__init__()
        self.register_buffer("X", torch.tensor([[1.0, -2.0], [0.5, 1.5], [-1.0, 0.3]], dtype=DT))
        self.W = nn.Parameter(torch.tensor([[0.2, -0.7], [1.1, 0.4], [-0.3, 0.9]], dtype=DT))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs) -> SimpleNamespace:
        return SimpleNamespace(logits=self.X[input_ids] @ self.W.T)


def _mas_batch(ids: list[int], labels: list[int]) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
            "labels": torch.tensor([labels])}


MAS_ROWS = [  # example 0: targets at positions 1 and 2, predicted from tokens 0 and 1; example 1: one, from token 2
    {"batch": _mas_batch([0, 1, 2], [-100, 1, 2])},
    {"batch": _mas_batch([2, 2, 0], [-100, -100, 0])},
]


def _mas_ctx(model: nn.Module, spec: str, experience: int = 0) -> SimpleNamespace:
    return SimpleNamespace(model=model, collate=lambda rows: rows[0]["batch"], example_passes=0, experience=experience,
                           task=SimpleNamespace(name="t", train=MAS_ROWS), stream=None,
                           config=SimpleNamespace(seed=0))


def _mas_grads(model: Bilinear) -> tuple[torch.Tensor, torch.Tensor]:
    """∂‖F‖²/∂W of each example of MAS_ROWS, ‖F‖² averaged over its target positions: 2 (W x) xᵀ per position."""
    W, X = model.W.detach(), model.X

    def grad(token: int) -> torch.Tensor:
        return 2 * torch.outer(W @ X[token], X[token])

    return (grad(0) + grad(1)) / 2, grad(2)


def _mas_by_hand(model: Bilinear) -> torch.Tensor:
    g0, g1 = _mas_grads(model)
    return (g0.abs() + g1.abs()) / 2


def test_mas_output_norm_importance_and_penalty_by_hand():
    model = Bilinear()
    b = MAS_ROWS[0]["batch"]
    logits = model(b["input_ids"], b["attention_mask"]).logits
    rows, example = at_targets(logits, b["labels"])
    torch.testing.assert_close(rows, logits[0, :2])
    assert example.tolist() == [0, 0]
    torch.testing.assert_close(output_sq_norm(model, b), logits[0, :2].pow(2).sum() / 2)
    lam = 2.0
    mas = build_strategy(f"mas(lambda={lam}, samples=2)")[0]
    ctx = _mas_ctx(model, "mas")
    mas.after_training_exp(ctx)
    omega = _mas_by_hand(model)
    torch.testing.assert_close(mas.importance["W"], omega)
    assert ctx.example_passes == 2
    g0, g1 = _mas_grads(model)  # mean of |per-example gradient|, not Avalanche's |batch gradient|: they differ here
    assert not torch.allclose(omega, ((g0 + g1) / 2).abs())
    anchor = model.W.detach().clone()
    with torch.no_grad():
        model.W.add_(0.1)
    torch.testing.assert_close(mas.penalty(model), lam * (omega * 0.1 ** 2).sum())
    # a second task adds its Ω; the anchor moves to the weights after it
    mas.after_training_exp(_mas_ctx(model, "mas", experience=1))
    torch.testing.assert_close(mas.importance["W"], omega + _mas_by_hand(model))
    torch.testing.assert_close(mas.anchor["W"], anchor + 0.1)
    assert mas.experiences == [0, 1]


# --- SI ---------------------------------------------------------------------------------------------------------
def test_si_path_integral_and_penalty_by_hand():
    lr, xi, lam, steps = 0.5, 1e-3, 0.7, 4
    c = torch.tensor([1.0, -2.0], dtype=DT)
    ctx = toy_ctx(Toy([0.3, 0.4], [c.tolist()]), f"si(lambda={lam}, xi={xi})", lr=lr)
    si = ctx.plugins[0]
    ctx.experience = 0
    si.before_training_exp(ctx)
    w0 = ctx.model.w.detach().clone()
    w, omega = w0.clone(), torch.zeros(2, dtype=DT)
    for ctx.step in range(steps):
        step(ctx, toy_batch([0]))
        g = sp(c @ w) * c  # SGD: Δθ = -lr g, so -g·Δθ = lr g² per weight
        omega += -g * (-lr * g)
        w = w - lr * g
    torch.testing.assert_close(ctx.model.w.detach(), w)
    si.after_training_exp(ctx)
    big = omega / ((w - w0) ** 2 + xi)
    torch.testing.assert_close(si.importance["w"], big)
    torch.testing.assert_close(si.anchor["w"], w)
    with torch.no_grad():
        ctx.model.w.add_(torch.tensor([0.2, -0.1], dtype=DT))
    expected = lam * (big * torch.tensor([0.2, -0.1], dtype=DT) ** 2).sum()
    torch.testing.assert_close(si.penalty(ctx.model), expected)
    assert not {"_omega", "_moved", "_hook"} & set(vars(si))  # released after the experience


def test_si_importance_is_never_negative():
    """A weight that moved up its gradient (as momentum can make it) gets Ω = 0, not a negative pull. SI reads g
    before a gradient plugin changes it: here one that flips it, so the step goes uphill."""
    class Flip(Strategy):
        kind = "gradient"

        def before_update(self, c):
            c.model.w.grad.neg_()

    ctx = toy_ctx(Toy([0.3, 0.4], [[1.0, -2.0]]), "si")
    ctx.plugins.append(Flip())
    si = ctx.plugins[0]
    ctx.experience = 0
    si.before_training_exp(ctx)
    step(ctx, toy_batch([0]))
    si.after_training_exp(ctx)
    assert torch.equal(si.importance["w"], torch.zeros(2))


# --- LwF --------------------------------------------------------------------------------------------------------
def _record_terms(plugin) -> list[torch.Tensor]:
    terms, real = [], plugin.before_backward

    def recorded(ctx):
        t = real(ctx)
        terms.append(None if t is None else t.detach().clone())
        return t

    plugin.before_backward = recorded
    return terms


def _lwf_by_hand(student: nn.Module, teacher: nn.Module, batch: dict, lam: float, t: float) -> torch.Tensor:
    """lambda T² · mean over examples of the mean over its target tokens of KL(softmax(z_old/T) ‖ softmax(z/T))."""
    with torch.no_grad():
        z = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].double()
        zo = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].double()
    mask = batch["labels"][:, 1:] != -100
    p, log_p, log_q = F.softmax(zo / t, -1), F.log_softmax(zo / t, -1), F.log_softmax(z / t, -1)
    kl = (p * (log_p - log_q)).sum(-1)
    per_example = (kl * mask).sum(1) / mask.sum(1)
    return lam * t * t * per_example.mean()


def _lwf_ctx(spec: str, grad_accum: int = 1) -> tuple[Context, list[dict]]:
    model, tok = tiny_llama(seed=1)
    cfg = RunConfig(stream="unit", strategy=spec, seed=0,
                    train=TrainConfig(optimizer="SGD", lr=0.5, steps=4, max_grad_norm=None, batch_size=4,
                                      grad_accum=grad_accum))
    ctx = Context(model, tok, None, cfg, build_strategy(spec), random.Random(0))
    ctx.optimizer = torch.optim.SGD(ctx.trainable_parameters(), lr=0.5)
    ctx.step, ctx.total_steps, ctx.experience = 0, 4, 1
    rows = [{"prompt": p, "target": t} for p, t in [("abc:", "cba"), ("de:", "ed"), ("fghij:", "j"), ("k:", "kk")]]
    return ctx, rows


def test_lwf_term_by_hand_zero_at_the_teacher_and_in_both_sam_passes():
    lam, t = 1.5, 2.0
    ctx, rows = _lwf_ctx(f"sam(rho=0.5)+lwf(lambda={lam}, temperature={t})")
    lwf = ctx.plugins[0]
    lwf.before_training_exp(ctx)  # the teacher: the weights now
    teacher = copy.deepcopy(ctx.model)
    terms = _record_terms(lwf)
    batch = collate(ctx.tokenizer, rows, False, 32)
    calls = step(ctx, batch, n=len(rows))
    assert len(terms) == 2  # one micro-batch, two SAM passes: the term is in both
    assert float(terms[0]) == pytest.approx(0.0, abs=1e-7)  # student == teacher at the first pass
    at_e = copy.deepcopy(teacher)
    with torch.no_grad():  # the student as SAM's second pass saw it: w + e
        for p, w in zip(at_e.parameters(), calls[1]):
            p.copy_(w)
    assert float(terms[1]) > 1e-6
    assert float(terms[1]) == pytest.approx(float(_lwf_by_hand(at_e, teacher, batch, lam, t)), rel=1e-4)
    assert lwf.counts["teacher_examples"] == len(rows)  # one teacher forward per micro-batch, reused by pass two
    # the next step's first pass, at the weights the step moved to: by hand again, with a fresh teacher forward
    ctx.step = 1
    moved = copy.deepcopy(ctx.model)
    step(ctx, batch, n=len(rows))
    assert float(terms[2]) > 1e-6
    assert float(terms[2]) == pytest.approx(float(_lwf_by_hand(moved, teacher, batch, lam, t)), rel=1e-4)
    assert lwf.counts["teacher_examples"] == 2 * len(rows)
    lwf.after_training_exp(ctx)
    assert lwf.teacher is None and not {"teacher", "_hook", "_cache"} & set(vars(lwf))


def test_lwf_first_experience_has_no_term_and_accumulation_matches_one_batch():
    ctx, rows = _lwf_ctx("lwf")
    ctx.experience = 0
    lwf = ctx.plugins[0]
    lwf.before_training_exp(ctx)
    assert lwf.teacher is None and lwf.before_backward(ctx) is None
    # two micro-batches of two examples give the term of one batch of four (per-example means)
    one, two = _lwf_ctx("lwf(lambda=3)")[0], _lwf_ctx("lwf(lambda=3)", grad_accum=2)[0]
    for c in (one, two):
        c.plugins[0].before_training_exp(c)
        with torch.no_grad():  # move the student off the teacher
            for p in c.model.parameters():
                p.mul_(1.05)
    grads = []
    for c, micro in ((one, [collate(one.tokenizer, rows, False, 32)]),
                     (two, [collate(two.tokenizer, rows[:2], False, 32), collate(two.tokenizer, rows[2:], False, 32)])):
        loss = make_closure(c, micro, rows, c.trainable_parameters())()
        grads.append((float(loss), [p.grad.clone() for p in c.trainable_parameters()]))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-5)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert two.plugins[0].counts["teacher_examples"] == 4 and len(two.plugins[0]._cache) == 2


def test_lwf_refuses_a_term_without_the_engines_forward():
    """The student's logits come from the closure's forward of ctx.batch; a call without it is an error, not a
    silent second forward."""
    ctx, rows = _lwf_ctx("lwf")
    lwf = ctx.plugins[0]
    lwf.before_training_exp(ctx)
    ctx.batch = collate(ctx.tokenizer, rows, False, 32)
    with pytest.raises(RuntimeError, match="forward of the current micro-batch"):
        lwf.before_backward(ctx)


# --- resume of a composed run -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_composed_run_resumes_to_the_uninterrupted_record(tiny_stream, tmp_path, monkeypatch):
    spec = "sam+agem(sample=4)+lwf+mas(samples=8)+si+l2sp"
    cfg = resolve_config(tiny_stream, spec, 0, train={"steps": 2}, eval={"max_examples": 2})
    ref = run_one(tiny_stream, cfg, tmp_path / "ref", progress=False)
    interrupt_after_first(monkeypatch, tiny_stream, cfg, tmp_path / "cut")
    resumed = run_one(tiny_stream, cfg, tmp_path / "cut", progress=False, resume=True)
    assert comparable(resumed) == comparable(ref)
    cost = comparable(ref)["cost"]
    assert 0 <= cost["agem_projected_fraction"] <= 1 and cost["teacher_forward_multiplier"] == pytest.approx(0.5)


# --- avalanche-lib 0.6.0 --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def av():
    """avalanche's plugins (slow import, so only loaded for the cross-check tests)."""
    pytest.importorskip("avalanche.training.plugins")
    from avalanche.training.plugins import AGEMPlugin
    from avalanche.training.regularization import LearningWithoutForgetting
    return SimpleNamespace(AGEMPlugin=AGEMPlugin, LwF=LearningWithoutForgetting)


@pytest.mark.slow
@pytest.mark.parametrize("memory_token", [1, 0])
def test_agem_projection_equals_avalanches(av, memory_token):
    """Avalanche's AGEMPlugin.after_backward on the same g and g_ref gives the same projected gradient."""
    model = nn.Linear(3, 2)
    g = torch.randn(2, 3, generator=torch.Generator().manual_seed(0)), torch.randn(2)
    r = [torch.randn_like(p) for p in model.parameters()]
    if memory_token == 0:  # agreeing
        r = [x.clone() for x in g]
    else:
        r = [-x + 0.1 * y for x, y in zip(g, r)]
    plugin = av.AGEMPlugin(patterns_per_experience=1, sample_size=1)
    plugin.buffers = [None]
    plugin.reference_gradients = torch.cat([x.flatten() for x in r])
    for p, x in zip(model.parameters(), g):
        p.grad = x.clone()
    plugin.after_backward(SimpleNamespace(model=model, device="cpu"))
    ours = [x.clone() for x in g]
    assert project(ours, r) == (memory_token == 1)
    for p, x in zip(model.parameters(), ours):
        torch.testing.assert_close(p.grad, x)


@pytest.mark.slow
def test_lwf_distillation_equals_avalanches_times_t_squared(av):
    """On one example, ours is lambda · T² · Avalanche's batchmean KL over the target rows (Avalanche has no T²)."""
    lam, t = 0.5, 3.0
    ctx, rows = _lwf_ctx(f"lwf(lambda={lam}, temperature={t})")
    lwf = ctx.plugins[0]
    lwf.before_training_exp(ctx)
    teacher = copy.deepcopy(ctx.model)
    with torch.no_grad():
        for p in ctx.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    terms = _record_terms(lwf)
    batch = collate(ctx.tokenizer, rows[:1], False, 32)
    make_closure(ctx, [batch], rows[:1], ctx.trainable_parameters())()
    z, _ = at_targets(ctx.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                      batch["labels"])
    zo, _ = at_targets(teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                       batch["labels"])
    theirs = av.LwF(alpha=1, temperature=t)._distillation_loss(z.detach(), zo.detach(), range(z.shape[1]))
    assert float(terms[0]) == pytest.approx(lam * t * t * float(theirs), rel=1e-5)


# --- data parallelism -------------------------------------------------------------------------------------------
DDP_SPEC = "sam(rho=0.1)+agem(size=16, sample=3)+lwf(lambda=5)+mas(lambda=100, samples=8)+si(lambda=10)+l2sp"


def _ddp_worker(rank: int, port: int, tmp: str) -> None:
    import os
    from datetime import timedelta

    from test_distributed import _run

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=180))
    try:
        from clsuite.streams import load_stream
        torch.save(_run(load_stream(TINY_STREAM), DDP_SPEC, {"grad_accum": 2}), f"{tmp}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_processes_equal_one_process_with_all_five(tmp_path):
    """All five under 2 gloo processes (A-GEM's memory batch of 3 split 2 + 1 over the ranks, two micro-batches
    each) stay within test_distributed's tolerance of one process on the same global batches."""
    import torch.multiprocessing as mp
    from test_distributed import TOL, _free_port, _max_diff, _run

    from clsuite.streams import load_stream

    mp.spawn(_ddp_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    one = _run(load_stream(TINY_STREAM), DDP_SPEC, {"grad_accum": 1})
    assert all(torch.equal(x, y) for x, y in zip(a["weights"], b["weights"]))
    assert _max_diff(a["weights"], one["weights"]) < TOL
    assert a["example_passes"] == one["example_passes"]
