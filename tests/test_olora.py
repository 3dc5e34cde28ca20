"""O-LoRA: the penalty against the formula by hand, its gradient, the merge and the stored A, the engine's objective,
two-task CLI runs (alone and with SAM), state round-trip and refused combinations."""
from __future__ import annotations

import random
from itertools import pairwise
from types import SimpleNamespace

import pytest
import torch

from clsuite.benchmarks.models.tiny_synthetic import MODEL_CONFIG, make_tokenizer
from clsuite.config import RunConfig, TrainConfig
from clsuite.data import collate, lm_loss
from clsuite.engine import Context, make_closure
from clsuite.errors import UserError
from clsuite.records import read_record
from clsuite.strategies.olora import orthogonality
from clsuite.strategy import build_strategy

from conftest import tiny_llama, tiny_runs

TOK = make_tokenizer()
MODULES = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"]
ROWS = [{"prompt": "max 1 7:", "target": "7"}, {"prompt": "copy ab:", "target": "ab"}]


def two_tasks(experience: int) -> SimpleNamespace:
    """What the hooks read of a context: the model is set by the caller; a stream of two tasks."""
    return SimpleNamespace(model=None, stream=SimpleNamespace(tasks=[None, None]), experience=experience)


def randomize(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g))


def l1_by_hand(ai: torch.Tensor, at: torch.Tensor) -> float:
    """Σ_jk |Σ_l ai[j, l]·at[k, l]| with Python floats."""
    a, b = ai.tolist(), at.tolist()
    return sum(abs(sum(x * y for x, y in zip(row_i, row_t))) for row_i in a for row_t in b)


def after_first_task(spec: str, seed: int = 0):
    """An olora plugin that trained (random adapter) and merged experience 0 of two: (plugin, ctx, A_1, B_1, W0)."""
    (olora,) = build_strategy(spec)
    ctx = two_tasks(0)
    ctx.model = tiny_llama(tie=True)[0]
    w0 = {n: p.detach().clone() for n, p in ctx.model.named_parameters()}
    olora.before_training_exp(ctx)
    randomize(ctx.model, seed)
    layers = {m: getattr(ctx.model.base_model.model.model.layers[0].self_attn, m.rsplit(".", 1)[1]) for m in MODULES}
    a1 = {m: l.lora_A["default"].weight.detach().clone() for m, l in layers.items()}
    b1 = {m: l.lora_B["default"].weight.detach().clone() for m, l in layers.items()}
    olora.after_training_exp(ctx)
    return olora, ctx, a1, b1, w0


def current_a(model) -> dict[str, torch.nn.Parameter]:
    attn = model.base_model.model.model.layers[0].self_attn
    return {m: getattr(attn, m.rsplit(".", 1)[1]).lora_A["default"].weight for m in MODULES}


def test_penalty_equals_the_formula_by_hand():
    (olora,) = build_strategy("olora(r=2, lambda_1=0.5)")
    ctx = two_tasks(1)
    ctx.model = tiny_llama(tie=True)[0]
    olora.before_training_exp(ctx)
    assert olora.penalty() is None  # nothing stored yet: plain LoRA
    randomize(ctx.model, 1)
    g = torch.Generator().manual_seed(2)
    earlier = [{m: torch.randn(2, 16, generator=g) for m in MODULES} for _ in range(2)]  # A_1, A_2 (r x in)
    olora.stored = {m: torch.cat([e[m] for e in earlier]) for m in MODULES}
    at = current_a(ctx.model)
    want = 0.5 * sum(l1_by_hand(e[m], at[m].detach()) for e in earlier for m in MODULES)
    assert olora.penalty().item() == pytest.approx(want, rel=1e-6)
    assert olora.before_backward(ctx).item() == pytest.approx(want, rel=1e-6)
    # with lambda_2: + lambda_2 · Σ p² over the new adapter's A and B
    (both,) = build_strategy("olora(r=2, lambda_1=0.5, lambda_2=0.25)")
    both.peft_model, both._current, both.stored = olora.peft_model, olora._current, olora.stored
    sq = sum(x * x for n, p in ctx.model.named_parameters() if ".lora_" in n for x in p.detach().flatten().tolist())
    assert both.penalty().item() == pytest.approx(want + 0.25 * sq, rel=1e-6)


def test_gradient_moves_a_only_out_of_the_earlier_subspace():
    """∂|S Aᵀ|/∂A = sign(S Aᵀ)ᵀ S lies in the row space of S: SGD on the penalty alone shrinks A's component in it
    and leaves the orthogonal component as it was."""
    g = torch.Generator().manual_seed(0)
    s = torch.randn(4, 16, generator=g, dtype=torch.float64)  # two earlier tasks of rank 2
    a = torch.randn(2, 16, generator=g, dtype=torch.float64).requires_grad_()
    q, _ = torch.linalg.qr(s.T)  # orthonormal basis of span(S's rows)
    proj = q @ q.T
    inside0, outside0 = (a.detach() @ proj).norm(), a.detach() - a.detach() @ proj
    opt = torch.optim.SGD([a], lr=0.01)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = orthogonality({"m": s}, {"m": a})
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0] and all(y <= x for x, y in pairwise(losses))
    assert (a.detach() @ proj).norm() < 0.5 * inside0
    torch.testing.assert_close(a.detach() - a.detach() @ proj, outside0, rtol=0, atol=1e-12)


def test_merge_is_the_hand_update_and_the_stored_a_is_frozen():
    olora, ctx, a1, b1, w0 = after_first_task("olora(r=2, alpha=8)")
    assert type(ctx.model).__name__ == "LlamaForCausalLM"  # merged: the plain model is back
    params = dict(ctx.model.named_parameters())
    for n, w in w0.items():
        m = n.removesuffix(".weight")
        want = w + 4.0 * b1[m] @ a1[m] if m in a1 else w  # alpha / r = 4
        torch.testing.assert_close(params[n].detach(), want, rtol=0, atol=1e-5)
    assert sorted(olora.stored) == MODULES and olora.experiences == [0]
    assert all(torch.equal(olora.stored[m], a1[m]) and not olora.stored[m].requires_grad for m in MODULES)
    assert olora.extra_memory_bytes() == 2 * (2 * 16) * 4  # q, v: one 2 x 16 float32 A
    # experience 1: a fresh adapter is the only thing trained; the merged update and the stored A stay
    ctx.experience = 1
    olora.before_training_exp(ctx)
    trainable = {n for n, p in ctx.model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    merged = {n: p.detach().clone() for n, p in ctx.model.named_parameters() if ".lora_" not in n}
    opt = torch.optim.SGD([p for p in ctx.model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        olora.penalty().backward()
        opt.step()
    assert all(torch.equal(olora.stored[m], a1[m]) for m in MODULES)
    assert all(torch.equal(p, merged[n]) for n, p in ctx.model.named_parameters() if ".lora_" not in n)
    assert not all(torch.equal(current_a(ctx.model)[m], a1[m]) for m in MODULES)
    olora.after_training_exp(ctx)  # the last task: merged, not stored
    assert olora.experiences == [0] and olora.stored[MODULES[0]].shape == (2, 16)
    assert type(ctx.model).__name__ == "LlamaForCausalLM"


def test_the_engine_objective_adds_the_penalty_to_the_new_a_only():
    olora, ctx, _, _, _ = after_first_task("olora(r=2, lambda_1=0.5)")
    ctx.experience = 1
    olora.before_training_exp(ctx)
    randomize(ctx.model, 3)
    cfg = RunConfig(stream="unit", strategy="olora", train=TrainConfig(optimizer="SGD", lr=0.1, max_grad_norm=None))
    engine = Context(ctx.model, TOK, None, cfg, [olora], random.Random(0))
    params = engine.trainable_parameters()
    engine.optimizer = torch.optim.SGD(params, lr=0.1)
    batch = collate(TOK, ROWS, False, 32)
    make_closure(engine, [batch], ROWS, params)()
    got = {n: p.grad.clone() for n, p in ctx.model.named_parameters() if p.requires_grad}
    names = [n for n, p in ctx.model.named_parameters() if p.requires_grad]
    task = dict(zip(names, torch.autograd.grad(lm_loss(ctx.model, batch), params)))
    pen = dict(zip(names, torch.autograd.grad(olora.penalty(), params, allow_unused=True)))
    for n in names:
        want = task[n] + (pen[n] if pen[n] is not None else 0)
        torch.testing.assert_close(got[n], want, rtol=1e-5, atol=1e-6)
        assert (pen[n] is not None) == ("lora_A" in n), n  # the penalty reaches A, never B


def test_two_task_cli_runs_alone_and_with_sam(cli, tmp_path):
    out = tiny_runs(cli, tmp_path, "olora,sam+olora", "0")
    recs = {read_record(p).strategy: read_record(p) for p in sorted(out.rglob("seed0.json"))}
    assert set(recs) == {"olora", "olora+sam"}
    for rec in recs.values():
        assert rec.status == "complete" and len(rec.R) == 3 and all(len(row) == 2 for row in rec.R)
        assert [e["steps"] for e in rec.experiences] == [2, 2]
        assert rec.cost["extra_memory_bytes"] > 0  # experience 0's A factors
        assert all(v is not None for k, v in rec.metrics.items() if not k.startswith("probe"))
    size = MODEL_CONFIG["hidden_size"] * MODEL_CONFIG["num_hidden_layers"]
    assert recs["olora"].cost["extra_memory_bytes"] == 8 * size * 2 * 4  # r=8 rows of q_proj's and v_proj's A
    assert recs["olora+sam"].cost["extra_memory_bytes"] > recs["olora"].cost["extra_memory_bytes"]  # + SAM's copy
    assert recs["olora"].cost["compute_multiplier"] == 1.0 and recs["olora+sam"].cost["compute_multiplier"] >= 2.0


def test_state_round_trip():
    a, ctx, _, _, _ = after_first_task("olora(r=2)")
    state = a.state_dict()
    assert state["experiences"] == [0] and sorted(state["A"]) == MODULES
    (b,) = build_strategy("olora(r=2)")
    b.load_state_dict(state)
    assert b.experiences == [0] and all(torch.equal(b.stored[m], a.stored[m]) for m in MODULES)
    assert b.extra_memory_bytes() == a.extra_memory_bytes()
    ctx.experience = 1
    a.before_training_exp(ctx)
    randomize(ctx.model, 4)
    b.peft_model, b._current = a.peft_model, a._current
    assert b.penalty().item() == a.penalty().item() > 0
    (wrong,) = build_strategy("olora(r=4)")
    with pytest.raises(ValueError, match="r=4"):
        wrong.load_state_dict(state)


def test_combinations():
    with pytest.raises(UserError, match="two parametrizations"):
        build_strategy("lora(mode=merge)+olora")
    for other in ("ewc", "mas", "si", "l2sp"):
        with pytest.raises(UserError, match="fresh adapter"):
            build_strategy(f"olora+{other}")
    assert [p.name for p in build_strategy("wiseft(anchor=previous)+olora+sam")] == ["olora", "wiseft", "sam"]
    with pytest.raises(UserError, match="lambda_1"):
        build_strategy("olora(lambda_1=-1)")
