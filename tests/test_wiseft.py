"""Wise-FT: exact ends (alpha 0 and 1), the midpoint, both anchors, and its composition with LoRA."""
from __future__ import annotations

import copy
import json
from types import SimpleNamespace

from conftest import tiny_llama
import pytest
import torch

from clsuite.errors import UserError
from clsuite.strategy import build_strategy


def tiny_model(seed: int = 0):
    return tiny_llama(seed, tie=True)[0]


def ctx_for(spec: str, model):
    ctx = SimpleNamespace(model=model, plugins=build_strategy(spec), config=SimpleNamespace(seed=0))
    ctx.call = lambda hook: [getattr(p, hook)(ctx) for p in ctx.plugins]
    return ctx


def state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@torch.no_grad()
def fine_tune(model, seed: int) -> None:
    """Stand-in for training: move every trainable parameter."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def one_experience(ctx, seed: int) -> None:
    ctx.call("before_training_exp")
    fine_tune(ctx.model, seed)
    ctx.call("after_training_exp")


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_interpolation(alpha):
    ctx = ctx_for(f"wiseft(alpha={alpha})", tiny_model())
    ctx.model.model.norm.weight.requires_grad_(False)  # a frozen weight is neither stored nor touched
    theta0 = state(ctx.model)
    ctx.call("before_training")
    ctx.call("before_training_exp")
    fine_tune(ctx.model, 1)
    theta1 = state(ctx.model)
    ctx.call("after_training_exp")
    out = state(ctx.model)
    for n in out:
        if alpha == 0.0:
            assert torch.equal(out[n], theta0[n]), n  # exactly the anchor
        elif alpha == 1.0:
            assert torch.equal(out[n], theta1[n]), n  # exactly the fine-tuned weights
        else:
            torch.testing.assert_close(out[n], (theta0[n] + theta1[n]) / 2, rtol=0, atol=1e-7)
    assert torch.equal(out["model.norm.weight"], theta0["model.norm.weight"])
    (w,) = ctx.plugins
    assert "model.norm.weight" not in w.anchor
    assert w.extra_memory_bytes() == 4 * sum(p.numel() for p in ctx.model.parameters() if p.requires_grad)


@pytest.mark.parametrize("anchor", ["initial", "previous"])
def test_anchor_initial_vs_previous(anchor):
    alpha = 0.5
    ctx = ctx_for(f"wiseft(alpha={alpha}, anchor={anchor})", tiny_model())
    theta0 = state(ctx.model)
    ctx.call("before_training")
    d = []
    for e in range(2):
        before = state(ctx.model)
        ctx.call("before_training_exp")
        fine_tune(ctx.model, 10 + e)
        d.append({n: p.detach() - before[n] for n, p in ctx.model.named_parameters()})
        ctx.call("after_training_exp")
    out = state(ctx.model)
    for n in out:
        if anchor == "initial":  # theta0 + a*(a*d1 + d2)
            want = theta0[n] + alpha * (alpha * d[0][n] + d[1][n])
        else:  # theta0 + a*d1 + a*d2
            want = theta0[n] + alpha * d[0][n] + alpha * d[1][n]
        torch.testing.assert_close(out[n], want, rtol=0, atol=1e-6)


def test_state_dict_round_trip_and_alias():
    (w,) = build_strategy("wise-ft(alpha=0.25)")
    assert w.name == "wiseft"
    ctx = ctx_for("wiseft(alpha=0.25)", tiny_model())
    ctx.call("before_training")
    st = ctx.plugins[0].state_dict()
    assert all(isinstance(v, torch.Tensor) for v in st["anchor"].values())
    json.dumps({k: v for k, v in st.items() if k != "anchor"})
    w.load_state_dict(st)
    assert w.anchor.keys() == ctx.plugins[0].anchor.keys()


@pytest.mark.parametrize("spec, match", [("wiseft(alpha=1.5)", "alpha"), ("wiseft(anchor=best)", "anchor")])
def test_bad_params(spec, match):
    with pytest.raises(UserError, match=match):
        build_strategy(spec)


def test_previous_anchor_with_a_kept_adapter_is_refused():
    with pytest.raises(UserError, match="rank-2r"):
        build_strategy("lora+wiseft(anchor=previous)")
    build_strategy("lora(mode=merge)+wiseft(anchor=previous)")
    build_strategy("lora+wiseft")


@torch.no_grad()
def train_adapter(model, seed: int) -> None:
    """Stand-in for training a LoRA adapter: random A and B (B no longer zero)."""
    g = torch.Generator().manual_seed(seed)
    for n, p in model.named_parameters():
        if ".lora_" in n:
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def delta(model) -> dict[str, torch.Tensor]:
    """s*B@A of every LoRA layer, keyed by the merged model's weight name."""
    from peft.tuners.lora import LoraLayer
    out = {}
    for n, m in model.named_modules():
        if isinstance(m, LoraLayer):
            out[n.removeprefix("base_model.model.") + ".weight"] = (
                m.scaling["default"] * m.lora_B["default"].weight @ m.lora_A["default"].weight).detach().clone()
    return out


def merged(model) -> dict[str, torch.Tensor]:
    return state(copy.deepcopy(model).merge_and_unload())


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_lora_continue_with_initial_anchor_is_exact(alpha):
    """lora(continue)+wiseft: the merged weights are theta0 + alpha*s*B*A (B scaled in place, base untouched)."""
    ctx = ctx_for(f"lora(r=2, alpha=4)+wiseft(alpha={alpha})", tiny_model())
    theta0 = state(ctx.model)
    ctx.call("before_training")
    model = ctx.model
    ctx.call("before_training_exp")
    train_adapter(ctx.model, 1)
    dw = delta(ctx.model)
    assert set(dw) == {"model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.v_proj.weight"}
    ctx.call("after_training_exp")
    assert ctx.model is model
    out = merged(ctx.model)
    for n in theta0:
        want = theta0[n] + alpha * dw[n] if n in dw else theta0[n]
        torch.testing.assert_close(out[n], want, rtol=0, atol=1e-6)
    assert ctx.plugins[1].extra_memory_bytes() == 0  # nothing stored: the anchor is the frozen base
    # the function matches too: logits of the adapted model equal those of a plain model with those weights
    ref = tiny_model()
    ref.load_state_dict({n: theta0[n] + alpha * dw[n] if n in dw else theta0[n] for n in theta0}, strict=False)
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    ctx.model.eval()
    ref.eval()
    torch.testing.assert_close(ctx.model(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=0, atol=1e-5)
    # a second experience continues from the scaled adapter: theta0 + alpha*(alpha*d1 + d2)
    before = delta(ctx.model)
    ctx.call("before_training_exp")
    train_adapter(ctx.model, 2)
    after = delta(ctx.model)
    ctx.call("after_training_exp")
    out = merged(ctx.model)
    for n in dw:
        torch.testing.assert_close(out[n], theta0[n] + alpha * after[n], rtol=0, atol=1e-6)
        torch.testing.assert_close(before[n], alpha * dw[n], rtol=0, atol=1e-6)


@pytest.mark.parametrize("anchor", ["initial", "previous"])
def test_lora_merge_interpolates_merged_weights(anchor):
    alpha = 0.4
    ctx = ctx_for(f"lora(r=2, alpha=4, mode=merge)+wiseft(alpha={alpha}, anchor={anchor})", tiny_model())
    theta0 = state(ctx.model)
    ctx.call("before_training")
    d = []
    for e in range(2):
        start = state(ctx.model)
        ctx.call("before_training_exp")
        train_adapter(ctx.model, e)
        d.append(delta(ctx.model))
        ctx.call("after_training_exp")
        assert type(ctx.model).__name__ == "LlamaForCausalLM"  # merged and unwrapped before Wise-FT ran
        out = state(ctx.model)
        for n in out:
            if n not in d[-1]:
                assert torch.equal(out[n], theta0[n]), n  # untouched layers stay bit-identical
            elif anchor == "previous":
                torch.testing.assert_close(out[n], start[n] + alpha * d[-1][n], rtol=0, atol=1e-6)
            else:
                torch.testing.assert_close(out[n], theta0[n] + alpha * (start[n] - theta0[n] + d[-1][n]),
                                           rtol=0, atol=1e-6)
    # only the adapted layers' weights are stored (q_proj and v_proj, 16x16 floats each)
    assert set(ctx.plugins[1].anchor) == set(d[0])
    assert ctx.plugins[1].extra_memory_bytes() == 2 * 16 * 16 * 4
