"""Turn (prompt, target) examples into token tensors, and compute the training loss on target tokens."""
from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F

from .errors import UserError
from .numerics import at_least_float32


def prompt_text(tok: Any, prompt: str, chat: bool, bos: bool = True) -> str:
    """The text the model sees before its answer: ``prompt`` after the tokenizer's BOS (``bos=False``: without it),
    or the chat template when the stream asks for it (its BOS as the template writes it; ``bos=False`` drops it)."""
    start = tok.bos_token or ""
    if chat:
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
        return text[len(start):] if not bos and start and text.startswith(start) else text
    return (start if bos else "") + prompt


def encode_pair(tok: Any, prompt: str, target: str, chat: bool, max_length: int, eos: bool = True,
                bos: bool = True, target_delimiter: str = "") -> tuple[list[int], list[int]]:
    """Token ids of prompt and ``target_delimiter + target``, tokenized apart so training and scoring see the same
    split (``bos``: see ``prompt_text``). The prompt is cut from the left when the pair is longer than ``max_length``.
    """
    p = tok(prompt_text(tok, prompt, chat, bos), add_special_tokens=False)["input_ids"]
    if not p and not bos:
        raise UserError(f"prompt {prompt!r:.40} is empty and bos: false leaves no token to predict the answer from; "
                        "give the rows a prompt or set bos: true")
    t = tok(target_delimiter + target, add_special_tokens=False)["input_ids"]
    if eos and tok.eos_token_id is not None:
        t = t + [tok.eos_token_id]
    t = t[:max_length - 1]
    p = p[-(max_length - len(t)):]
    return p, t


def collate(tok: Any, examples: list[dict], chat: bool, max_length: int, bos: bool = True,
            target_delimiter: str = "") -> dict[str, torch.Tensor]:
    """Right-padded batch with labels = -100 on prompt and padding (``bos``, ``target_delimiter``: see encode_pair)."""
    pairs = [encode_pair(tok, e["prompt"], e["target"], chat, max_length, bos=bos, target_delimiter=target_delimiter)
             for e in examples]
    width = max(len(p) + len(t) for p, t in pairs)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    ids = torch.full((len(pairs), width), pad, dtype=torch.long)
    labels = torch.full((len(pairs), width), -100, dtype=torch.long)
    mask = torch.zeros((len(pairs), width), dtype=torch.long)
    for i, (p, t) in enumerate(pairs):
        n = len(p) + len(t)
        ids[i, :n] = torch.tensor(p + t)
        labels[i, len(p):n] = torch.tensor(t)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def forward_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The logits ``(B, K, V)`` of the last K positions, from the earliest target position on: with long prompts and
    short answers, the vocabulary projection (and its softmax) at every prompt token is most of the head's cost."""
    dev = next(model.parameters()).device
    labels = batch["labels"][:, 1:]
    targets = labels != -100
    first = int(targets.any(0).nonzero()[0]) if targets.any() else 0
    kwargs = {"logits_to_keep": labels.shape[1] + 1 - first} if first and keeps_logits(model) else {}
    return model(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev),
                 **kwargs).logits


def lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], reduction: str = "mean") -> torch.Tensor:
    """Per-example mean NLL of the target tokens, averaged over examples (``reduction='none'``: per example).

    Averaging per example (not per token) makes k micro-batches of n examples equal one batch of k*n,
    which keeps gradient accumulation and data parallelism exact.
    """
    logits = forward_logits(model, batch)[:, :-1]
    labels = batch["labels"][:, 1:].to(logits.device)
    labels = labels[:, labels.shape[1] - logits.shape[1]:]
    logits = logits.to(at_least_float32(logits.dtype))  # a float64 model keeps float64 (EWC, SI, A-GEM read it)
    nll = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    per_example = nll.sum(1) / (labels != -100).sum(1).clamp(min=1)
    return per_example if reduction == "none" else per_example.mean()


def forward_takes(model: torch.nn.Module, name: str) -> bool:
    """Whether the forward of ``model`` (of the wrapped model, under PEFT, which passes arguments on) takes ``name``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return name in inspect.signature(base.forward).parameters


def keeps_logits(model: torch.nn.Module) -> bool:
    """Whether the model's forward takes ``logits_to_keep`` (most transformers causal LMs do)."""
    return forward_takes(model, "logits_to_keep")

