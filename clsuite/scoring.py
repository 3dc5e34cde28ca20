"""Scorers: exact match of greedy generation, multiple choice by log-likelihood, mean target log-likelihood.

Each takes the model, tokenizer and a list of examples and returns a dict whose ``score`` is the number
that enters the accuracy matrix, and ``items``, the per-example values it averages (for the protocol's bootstrap);
other keys are kept beside it in the run record.
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
    hits: list[int] = []
    for chunk in _batches(examples, batch_size):
        pairs = [encode_pair(tok, e["prompt"], e["target"], chat, max_length, bos=bos,
                             target_delimiter=target_delimiter) for e in chunk]
        ids, mask = _left_pad([p for p, _ in pairs], _pad_id(tok))
        new = max(len(t) for _, t in pairs) + 1
        out = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=new,
                             do_sample=False, pad_token_id=_pad_id(tok), eos_token_id=tok.eos_token_id)
        texts = tok.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
        hits += [int(t.strip() == e["target"].strip()) for t, e in zip(texts, chunk)]
    return {"score": sum(hits) / len(examples), "items": hits}


@torch.no_grad()
def choice_logliks(model, tok, examples: list[dict], chat: bool, max_length: int, batch_size: int, *,
                   bos: bool = True, target_delimiter: str = "") -> list[list[float]]:
    """Summed log-likelihood of each ``target_delimiter + choice``. The prompt runs once per question: its last
    position scores every choice's first token (all of a one-token choice), and only choices of two tokens or more
    continue from its cache, which is copied once per such choice."""
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
        flat = [(b, c) for b, cs in enumerate(choices) for c in cs]
        total = first[[b for b, _ in flat], [c[0] for _, c in flat]]
        longer = [i for i, (_, c) in enumerate(flat) if len(c) > 1]
        if longer:  # the rest of each longer choice, after its prompt: inputs c[:-1] predict c[1:]
            rows = torch.tensor([flat[i][0] for i in longer], device=dev)
            width = max(len(flat[i][1]) for i in longer) - 1
            cids = torch.full((len(longer), width), pad, dtype=torch.long, device=dev)
            targets = torch.zeros_like(cids)
            cmask = torch.zeros_like(cids)
            for j, i in enumerate(longer):
                c = flat[i][1]
                cids[j, :len(c) - 1] = torch.tensor(c[:-1], device=dev)
                targets[j, :len(c) - 1] = torch.tensor(c[1:], device=dev)
                cmask[j, :len(c) - 1] = 1
            key = _cache_kwarg(model)
            cache = getattr(out, key)
            cache.batch_select_indices(rows)
            cpos = pmask.sum(-1)[rows][:, None] + torch.arange(width, device=dev)[None]
            logits = model(input_ids=cids, attention_mask=torch.cat([pmask[rows], cmask], dim=1), position_ids=cpos,
                           **{key: cache}).logits.float()
            tok_lp = logits.gather(2, targets[..., None]).squeeze(-1) - torch.logsumexp(logits, -1)
            total = total.index_add(0, torch.tensor(longer, device=dev), (tok_lp * cmask).sum(1))
        it = iter(total.tolist())
        result.extend([next(it) for _ in cs] for cs in choices)
    return result


@register_scorer("multiple_choice", aliases=("mc",))
def multiple_choice(model, tok, examples: list[dict], chat: bool, max_length: int, batch_size: int, *,
                    bos: bool = True, target_delimiter: str = "") -> dict[str, float]:
    """Accuracy of the highest-likelihood choice; also the mean log-likelihood of the gold answer."""
    ll = choice_logliks(model, tok, examples, chat, max_length, batch_size, bos=bos, target_delimiter=target_delimiter)
    gold = [e["answer"] for e in examples]
    hits = [int(max(range(len(s)), key=s.__getitem__) == g) for s, g in zip(ll, gold)]
    gold_ll = [s[g] for s, g in zip(ll, gold)]
    return {"score": sum(hits) / len(examples), "gold_loglik": sum(gold_ll) / len(examples), "items": hits,
            "item_gold_loglik": gold_ll}


@register_scorer("loglik")
@torch.no_grad()
def loglik(model, tok, examples: list[dict], chat: bool, max_length: int, batch_size: int, *, bos: bool = True,
           target_delimiter: str = "") -> dict[str, float]:
    """Mean per-token log-likelihood of ``target_delimiter + target`` (higher is better); perplexity beside it."""
    items: list[float] = []
    for chunk in _batches(examples, batch_size):
        batch = collate(tok, chunk, chat, max_length, bos=bos, target_delimiter=target_delimiter)
        items += (-lm_loss(model, batch, reduction="none")).tolist()
    nll = -sum(items) / len(examples)
    return {"score": -nll, "perplexity": float(torch.exp(torch.tensor(nll))), "items": items}


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
