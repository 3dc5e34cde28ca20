"""The training loss: target tokens only, per-example mean, the same with or without trimmed logits."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clsuite.data import keeps_logits, collate, lm_loss
from conftest import tiny_llama

EXAMPLES = [{"prompt": "a" * n, "target": "xyz"[: 1 + n % 3]} for n in (3, 9, 14, 6)]


def reference_loss(model, batch) -> torch.Tensor:
    """Per-example mean NLL of the targets from the logits of every position."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    nll = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    return nll.sum(1) / (labels != -100).sum(1)


@pytest.mark.parametrize("lora", [False, True])
def test_trimmed_logits_give_the_full_loss_and_gradient(lora):
    model, tok = tiny_llama()
    if lora:
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    assert keeps_logits(model)
    batch = collate(tok, EXAMPLES, chat=False, max_length=64)
    ours = lm_loss(model, batch, reduction="none")
    ref = reference_loss(model, batch)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    params = [p for p in model.parameters() if p.requires_grad]
    g1 = torch.autograd.grad(ours.mean(), params)
    g2 = torch.autograd.grad(ref.mean(), params)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_model_without_logits_to_keep_is_run_whole():
    model, tok = tiny_llama()

    class Plain(torch.nn.Module):  # a causal LM whose forward knows nothing of logits_to_keep
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask)

    plain = Plain()
    assert not keeps_logits(plain)
    batch = collate(tok, EXAMPLES, chat=False, max_length=64)
    torch.testing.assert_close(lm_loss(plain, batch), lm_loss(model, batch))
