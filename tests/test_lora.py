"""LoRA: base weights untouched until a merge, merge vs continue, scorers and the loss on the PEFT model."""
from __future__ import annotations

import random
from types import SimpleNamespace

from conftest import tiny_llama
import pytest
import torch
from datasets import Dataset

from clsuite.benchmarks.builders.tiny_synthetic import tiny_task
from clsuite.benchmarks.models.tiny_synthetic import make_tokenizer
from clsuite.config import EvalConfig, RunConfig, TrainConfig
from clsuite.data import collate, lm_loss
from clsuite.engine import Context, run_stream
from clsuite.errors import UserError
from clsuite.scoring import choice_logliks, score
from clsuite.strategy import Strategy, build_strategy
from clsuite.streams import Stream, Task

TOK = make_tokenizer()
ADAPTED = {"model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.v_proj.weight"}


def tiny_model(seed: int = 0):
    return tiny_llama(seed, tie=True)[0]


def state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def base_state(model) -> dict[str, torch.Tensor]:
    """The base weights under their plain names, read through a PEFT wrapper if there is one."""
    out = {}
    for n, p in model.named_parameters():
        if ".lora_" not in n:
            out[n.removeprefix("base_model.model.").replace(".base_layer.", ".")] = p.detach().clone()
    return out


MC = [{"prompt": "max 1 7:", "target": "7", "choices": ["1", "7", "3"], "answer": 1},
      {"prompt": "copy ab:", "target": "ab", "choices": ["ab", "b", "abc"], "answer": 0}]


def tiny_stream() -> Stream:
    tasks = []
    for skill in ("addition", "reversal"):
        d = tiny_task(seed=0, skill=skill, n_train=24, n_eval=3)
        tasks.append(Task(skill, d["train"], d["eval"], "exact_match"))
    probes = [Task("mc", None, Dataset.from_list(MC), "multiple_choice"),
              Task("ll", None, tasks[0].eval, "loglik")]
    return Stream("mem", tasks, probes, model="tiny")


class Spy(Strategy):
    """Records the model the optimizer trains and the base weights just before LoRA's after_training_exp."""
    kind = "base"

    def __init__(self):
        super().__init__()
        self.models, self.base_before_merge = [], []

    def train_dataset_adaptation(self, ctx, dataset):  # called after every before_training_exp hook
        self.models.append(ctx.model)
        return dataset

    def after_training_exp(self, ctx):  # the spy is first in the plugin list: runs before LoRA's merge
        self.base_before_merge.append(base_state(ctx.model))


def run(spec: str, steps: int = 4):
    model = tiny_model()
    cfg = RunConfig(stream="mem", strategy=spec, train=TrainConfig(steps=steps, batch_size=4, max_length=32, lr=1e-2),
                    eval=EvalConfig(batch_size=4, max_length=32))
    spy = Spy()
    ctx = Context(model, TOK, tiny_stream(), cfg, [spy, *build_strategy(spec)], random.Random(0))
    theta0 = state(model)
    result = run_stream(ctx, progress=False)
    return ctx, spy, theta0, result


def test_continue_keeps_one_adapter_and_the_base_weights():
    ctx, spy, theta0, result = run("lora(r=2, dropout=0.1)")
    from peft import PeftModel
    assert isinstance(ctx.model, PeftModel) and list(ctx.model.peft_config) == ["default"]
    assert spy.models[0] is spy.models[1] is ctx.model  # one adapter, wrapped once, trained on both tasks
    assert all(torch.equal(v, theta0[n]) for n, v in base_state(ctx.model).items())  # bit-identical
    trainable = {n for n, p in ctx.model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert sum(p.numel() for p in ctx.trainable_parameters()) == 2 * (2 * 16 + 16 * 2)  # q, v: A (2x16), B (16x2)
    assert any(p.detach().abs().sum() > 0 for n, p in ctx.model.named_parameters() if "lora_B" in n)
    rows = result["rows"]
    assert len(rows) == 3 and all({"mc", "ll"} <= set(r["probes"]) for r in rows)


def test_merge_changes_base_only_at_merge():
    ctx, spy, theta0, _ = run("lora(r=2, mode=merge)")
    assert type(ctx.model).__name__ == "LlamaForCausalLM" and not hasattr(ctx.model, "peft_config")
    assert spy.models[0] is not spy.models[1]  # a fresh adapter per experience
    # before the first merge the base weights are untouched, although the adapter was trained
    assert all(torch.equal(v, theta0[n]) for n, v in spy.base_before_merge[0].items())
    after = state(ctx.model)
    for n in theta0:
        assert torch.equal(after[n], theta0[n]) == (n not in ADAPTED), n  # only q_proj and v_proj changed
    assert all(p.requires_grad for p in ctx.model.parameters())  # flags as before the wrap
    assert build_strategy("lora(mode=merge)")[0].extra_memory_bytes() == 0


def test_merge_equals_hand_computed_update():
    (lora,) = build_strategy("lora(r=2, alpha=8, mode=merge)")
    ctx = SimpleNamespace(model=tiny_model())
    theta0 = state(ctx.model)
    lora.before_training_exp(ctx)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in ctx.model.named_parameters():
            if ".lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g))
    attn = ctx.model.base_model.model.model.layers[0].self_attn
    want = {f"model.layers.0.self_attn.{m}.weight": theta0[f"model.layers.0.self_attn.{m}.weight"]
            + 4.0 * getattr(attn, m).lora_B["default"].weight @ getattr(attn, m).lora_A["default"].weight
            for m in ("q_proj", "v_proj")}
    lora.after_training_exp(ctx)
    for n, w in want.items():
        torch.testing.assert_close(dict(ctx.model.named_parameters())[n].detach(), w, rtol=0, atol=1e-5)


def test_scorers_and_loss_work_on_the_peft_model():
    """A fresh adapter (B = 0) leaves the function unchanged: every scorer and the loss agree with the plain model."""
    plain = tiny_model()
    (lora,) = build_strategy("lora(r=2, dropout=0.5, target_modules=all-linear)")
    wrapped = lora.wrap(tiny_model())
    stream = tiny_stream()
    rows = list(stream.tasks[0].eval)
    for name, data in (("exact_match", rows), ("loglik", rows), ("multiple_choice", MC)):
        assert score(name, wrapped, TOK, data, False, 32, 2) == score(name, plain, TOK, data, False, 32, 2), name
    torch.testing.assert_close(choice_logliks(wrapped, TOK, MC, False, 32, 2),
                               choice_logliks(plain, TOK, MC, False, 32, 2))
    batch = collate(TOK, rows, False, 32)
    plain.eval()
    wrapped.eval()
    torch.testing.assert_close(lm_loss(wrapped, batch), lm_loss(plain, batch))
    # with a trained adapter, dropout makes training passes random but scoring (eval mode) deterministic
    with torch.no_grad():
        for n, p in wrapped.named_parameters():
            if "lora_B" in n:
                p.normal_()
    wrapped.train()
    assert not torch.equal(lm_loss(wrapped, batch), lm_loss(wrapped, batch))
    assert score("loglik", wrapped, TOK, rows, False, 32, 2) == score("loglik", wrapped, TOK, rows, False, 32, 2)
    assert wrapped.training  # score() restores the mode
    adapted = {n.split(".")[-4] for n, _ in wrapped.named_parameters() if "lora_A" in n}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_unknown_target_module_is_a_user_error():
    (lora,) = build_strategy("lora(target_modules=[query])")
    with pytest.raises(UserError, match="q_proj"):
        lora.wrap(tiny_model())


@pytest.mark.parametrize("spec, match", [("lora(r=0)", "r"), ("lora(mode=stack)", "mode"), ("lora(dropout=1)", "dropout")])
def test_bad_params(spec, match):
    with pytest.raises(UserError, match=match):
        build_strategy(spec)


def test_state_dict_restores_the_adapter():
    (a,) = build_strategy("lora(r=2)")
    model = a.wrap(tiny_model())
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_" in n:
                p.normal_()
    st = a.state_dict()
    assert st["adapter"] and all(".lora_" in n for n in st["adapter"])
    (b,) = build_strategy("lora(r=2)")
    b.load_state_dict(st)  # applied at the next wrap
    other = b.wrap(tiny_model())
    assert all(torch.equal(p, dict(model.named_parameters())[n]) for n, p in other.named_parameters())
