"""Scorers: exact match of greedy generation, multiple choice by log-likelihood, mean target log-likelihood.

Each takes the model, tokenizer and a list of examples and returns a dict whose ``score`` is the number
that enters the accuracy matrix; other keys are kept beside it in the run record.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .data import collate, encode_pair, forward_takes, keeps_logits, lm_loss
from .errors import UserError
from .registry import Registry


ScorerFn = Callable[..., dict[str, float]]  # (model, tok, examples, chat, max_length, batch_size) -> {"score": ...}
# how prompt and answer are joined (docs/lm-eval.md); these defaults are the format every published number used
CONVENTIONS: dict[str, Any] = {"bos": True, "target_delimiter": ""}


@dataclass(frozen=True)
class Scorer:
    """A scoring function and the direction of its ``score``; calling it calls the function."""
    fn: ScorerFn
    higher_is_better: bool

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        return self.fn(*args, **kwargs)

    @property
    def takes_conventions(self) -> bool:
        """Whether the function takes the keyword arguments ``bos`` and ``target_delimiter`` (``CONVENTIONS``)."""
        return set(CONVENTIONS) <= set(inspect.signature(self.fn).parameters)


SCORERS: Registry[Scorer] = Registry("scorer", "clsuite.scorers", instance_of=Scorer)


def register_scorer(name: str, higher_is_better: bool = True,
                    aliases: tuple[str, ...] = ()) -> Callable[[ScorerFn], Scorer]:
    """Decorator: ``@register_scorer("x")`` on ``fn(model, tok, examples, chat, max_length, batch_size)`` returning
    ``{"score": float, ...}`` registers it and returns the ``Scorer`` (still callable as ``fn``). A function that also
    takes ``bos=True, target_delimiter=""`` keywords (see ``clsuite.data.encode_pair``) accepts tasks that set them."""
    return lambda fn: SCORERS.register(name, Scorer(fn, higher_is_better), aliases, origin=fn.__module__)


def check_conventions(name: str, conventions: dict[str, Any], where: str = "") -> dict[str, Any]:
    """The keyword arguments for scorer ``name``: ``conventions``, or none for a scorer that does not take them
    (then they must be the defaults: a UserError otherwise)."""
    if SCORERS.get(name).takes_conventions:
        return dict(conventions)
    if conventions != CONVENTIONS:
        raise UserError(f"{where + ': ' if where else ''}scorer {name!r} does not take bos:/target_delimiter: (its "
                        f"function has no such keywords); remove them or leave them at bos: true, target_delimiter: ''")
    return {}


def _batches(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i:i + size]


def _left_pad(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s)
        mask[i, width - len(s):] = 1
    return ids, mask


def _cache_kwarg(model: Any) -> str:
    """The name of the KV-cache argument and output: ``cache`` in newer transformers, ``past_key_values`` before."""
    return "cache" if forward_takes(model, "cache") else "past_key_values"


def _pad_id(tok: Any) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


@register_scorer("exact_match")
@torch.no_grad()
def exact_match(model, tok, examples: list[dict], chat: bool, max_length: int, batch_size: int, *, bos: bool = True,
                target_delimiter: str = "") -> dict[str, float]:
    """Greedy generation from the prompt; an answer counts when it equals the target after stripping white space
    (so ``target_delimiter`` changes only the generation budget, not the score)."""
    dev = next(model.parameters()).device
    hits = 0
    for chunk in _batches(examples, batch_size):
        pairs = [encode_pair(tok, e["prompt"], e["target"], chat, max_length, bos=bos,
                             target_delimiter=target_delimiter) for e in chunk]
        ids, mask = _left_pad([p for p, _ in pairs], _pad_id(tok))
        new = max(len(t) for _, t in pairs) + 1
        out = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=new,
                             do_sample=False, pad_token_id=_pad_id(tok), eos_token_id=tok.eos_token_id)
        texts = tok.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
        hits += sum(t.strip() == e["target"].strip() for t, e in zip(texts, chunk))
    return {"score": hits / len(examples)}


@torch.no_grad()
def choice_logliks(model, tok, examples: list[dict], chat: bool, max_length: int, batch_size: int, *,
                   bos: bool = True, target_delimiter: str = "") -> list[list[float]]:
    """Summed log-likelihood of each ``target_delimiter + choice``; the prompt runs once per question and its cache
    is shared."""
    dev = next(model.parameters()).device
    pad = _pad_id(tok)
    result: list[list[float]] = []
    for chunk in _batches(examples, batch_size):
        prompts, choices = [], []
        for e in chunk:
            p, _ = encode_pair(tok, e["prompt"], "", chat, max_length, eos=False, bos=bos)
            prompts.append(p)
            choices.append([tok(target_delimiter + c, add_special_tokens=False)["input_ids"] or [pad]
                            for c in e["choices"]])
        ids, pmask = _left_pad(prompts, pad)
        ids, pmask = ids.to(dev), pmask.to(dev)
        pos = (pmask.cumsum(-1) - 1).clamp(min=0)
        keep = {"logits_to_keep": 1} if keeps_logits(model) else {}  # only the last position predicts a choice
        out = model(input_ids=ids, attention_mask=pmask, position_ids=pos, use_cache=True, **keep)
        first = F.log_softmax(out.logits[:, -1].float(), -1)  # predicts each choice's first token
        k = max(len(c) for c in choices)
        flat = [(b, c) for b, cs in enumerate(choices) for c in cs + [[pad]] * (k - len(cs))]
        width = max(len(c) for _, c in flat)
        cids = torch.full((len(flat), width), pad, dtype=torch.long, device=dev)
        cmask = torch.zeros_like(cids)
        for i, (_, c) in enumerate(flat):
            cids[i, :len(c)] = torch.tensor(c, device=dev)
            cmask[i, :len(c)] = 1
        key = _cache_kwarg(model)
        cache = getattr(out, key)
        cache.batch_repeat_interleave(k)
        start = pmask.sum(-1).repeat_interleave(k)[:, None]
        cpos = start + torch.arange(width, device=dev)[None]
        full_mask = torch.cat([pmask.repeat_interleave(k, 0), cmask], dim=1)
        logits = model(input_ids=cids, attention_mask=full_mask, position_ids=cpos, **{key: cache}).logits
        logp = F.log_softmax(logits.float(), -1)
        tok_lp = torch.cat([first.repeat_interleave(k, 0).gather(1, cids[:, :1]),
                            logp[:, :-1].gather(2, cids[:, 1:, None]).squeeze(-1)], dim=1)
        total = (tok_lp * cmask).sum(1).view(len(chunk), k)
        result.extend(total[b, :len(cs)].tolist() for b, cs in enumerate(choices))
    return result


@register_scorer("multiple_choice", aliases=("mc",))
def multiple_choice(model, tok, examples: list[dict], chat: bool, max_length: int, batch_size: int, *,
                    bos: bool = True, target_delimiter: str = "") -> dict[str, float]:
    """Accuracy of the highest-likelihood choice; also the mean log-likelihood of the gold answer."""
    ll = choice_logliks(model, tok, examples, chat, max_length, batch_size, bos=bos, target_delimiter=target_delimiter)
    gold = [e["answer"] for e in examples]
    acc = sum(max(range(len(s)), key=s.__getitem__) == g for s, g in zip(ll, gold)) / len(examples)
    return {"score": acc, "gold_loglik": sum(s[g] for s, g in zip(ll, gold)) / len(examples)}


@register_scorer("loglik")
@torch.no_grad()
def loglik(model, tok, examples: list[dict], chat: bool, max_length: int, batch_size: int, *, bos: bool = True,
           target_delimiter: str = "") -> dict[str, float]:
    """Mean per-token log-likelihood of ``target_delimiter + target`` (higher is better); perplexity beside it."""
    total = 0.0
    for chunk in _batches(examples, batch_size):
        batch = collate(tok, chunk, chat, max_length, bos=bos, target_delimiter=target_delimiter)
        total += float(lm_loss(model, batch, reduction="none").sum())
    nll = total / len(examples)
    return {"score": -nll, "perplexity": float(torch.exp(torch.tensor(nll)))}


def score(name: str, model, tok, examples: list[dict], chat: bool, max_length: int, batch_size: int,
          bos: bool = True, target_delimiter: str = "") -> dict[str, float]:
    """Score ``examples`` with the named scorer, the model in eval mode (``bos``, ``target_delimiter``: CONVENTIONS)."""
    kwargs = check_conventions(name, {"bos": bos, "target_delimiter": target_delimiter})
    was_training = model.training
    model.eval()
    try:
        return SCORERS.get(name).fn(model, tok, examples, chat, max_length, batch_size, **kwargs)
    finally:
        model.train(was_training)
