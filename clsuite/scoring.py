"""Scorers: exact match of greedy generation, multiple choice by log-likelihood, mean target log-likelihood.

Each takes the model, tokenizer and a list of examples and returns a dict whose ``score`` is the number
that enters the accuracy matrix, and ``items``, the per-example values it averages (for the protocol's bootstrap);
other keys are kept beside it in the run record.
"""
from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

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


class _Hopeless(StoppingCriteria):
    """Stopping criterion: a row is done once its decoded answer can no longer equal its target after stripping
    white space (generation past that point cannot change the score). A partial UTF-8 character keeps it running."""

    def __init__(self, tok: Any, targets: list[str], start: int):
        self.tok, self.targets, self.start = tok, [t.strip() for t in targets], start

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        texts = self.tok.batch_decode(input_ids[:, self.start:], skip_special_tokens=True)
        return torch.tensor([not ("\ufffd" in s or t.startswith(s) or s.rstrip() == t)
                             for s, t in ((x.lstrip(), t) for x, t in zip(texts, self.targets))],
                            device=input_ids.device)


@register_scorer("exact_match")
@torch.no_grad()
def exact_match(model, tok, examples: list[dict], chat: bool, max_length: int, batch_size: int, *, bos: bool = True,
                target_delimiter: str = "") -> dict[str, float]:
    """Greedy generation from the prompt; an answer counts when it equals the target after stripping white space
    (so ``target_delimiter`` changes only the generation budget, not the score). Every item's budget is the longest
    target's tokens (with EOS) + 1; prompts run in batches of similar length, and a row stops at EOS or once it can
    no longer match (docs/lm-eval.md, "Speed")."""
    dev, pad = next(model.parameters()).device, _pad_id(tok)
    pairs = [encode_pair(tok, e["prompt"], e["target"], chat, max_length, bos=bos, target_delimiter=target_delimiter)
             for e in examples]
    new = max((len(t) for _, t in pairs), default=0) + 1
    hits = [0] * len(examples)
    order = sorted(range(len(examples)), key=lambda i: -len(pairs[i][0]))
    for chunk in _batches(order, batch_size):
        ids, mask = _left_pad([pairs[i][0] for i in chunk], pad)
        stop = StoppingCriteriaList([_Hopeless(tok, [examples[i]["target"] for i in chunk], ids.shape[1])])
        out = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=new,
                             do_sample=False, pad_token_id=pad, eos_token_id=tok.eos_token_id, stopping_criteria=stop)
        texts = tok.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
        for i, t in zip(chunk, texts):
            hits[i] = int(t.strip() == examples[i]["target"].strip())
    return {"score": sum(hits) / len(examples), "items": hits}


@dataclass(frozen=True)
class _Question:
    """One question laid out for a packed pass: its prompt, then each choice of two tokens or more but its last
    token, as a block that sees the prompt and itself only (so choices run without copying the prompt's cache)."""
    tokens: list[int]
    positions: list[int]  # each block continues from the prompt's end
    blocks: list[int]  # -1: the prompt; k: choice k's block
    scored: list[tuple[int, int, int]]  # (index whose logits predict it, token, choice number)


def _layout(prompt: list[int], choices: list[list[int]], start: int = 0) -> _Question:
    """The prompt's last position predicts every choice's first token (all of a one-token choice); block k's
    tokens ``c[:-1]`` predict ``c[1:]``. ``start``: the position of the prompt's first token (after a shared prefix)."""
    end = start + len(prompt)
    tokens, positions, blocks = list(prompt), list(range(start, end)), [-1] * len(prompt)
    scored = []
    for k, c in enumerate(choices):
        scored.append((len(prompt) - 1, c[0], k))
        scored += [(len(tokens) + j, t, k) for j, t in enumerate(c[1:])]
        tokens += c[:-1]
        positions += range(end, end + len(c) - 1)
        blocks += [k] * (len(c) - 1)
    return _Question(tokens, positions, blocks, scored)


def _shared_prefix(prompts: list[list[int]], least: int = 16) -> list[int]:
    """The longest token prefix of every prompt that leaves each at least one token (to predict its choices), if it
    has ``least`` tokens or more (a BOS alone is left in each prompt: computed apart, it moves scores by ~1e-4)."""
    if not prompts:
        return []
    n = min(map(len, prompts)) - 1
    first = prompts[0]
    for p in prompts[1:]:
        n = next((i for i in range(n) if p[i] != first[i]), n)
    return first[:n] if n >= least else []


def _pack(lengths: list[int], rows: int) -> list[list[list[int]]]:
    """Question indices by pass and row: longest first; a pass is up to ``rows`` rows as wide as its first question,
    and each question goes in the first row of any pass with room for it (first-fit decreasing)."""
    passes: list[list[list[int]]] = []
    free: list[list[int]] = []  # room left in each row of each pass
    width = 0  # of the last pass
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[i]
        where = next(((p, r) for p, room in enumerate(free) for r, f in enumerate(room) if f >= n), None)
        if where is None and passes and len(passes[-1]) < rows:  # a new row in the last pass
            where = (len(passes) - 1, len(passes[-1]))
            passes[-1].append([])
            free[-1].append(width)
        if where is None:  # a new pass, as wide as this question
            where, width = (len(passes), 0), n
            passes.append([[]])
            free.append([width])
        p, r = where
        passes[p][r].append(i)
        free[p][r] -= n
    return passes


def _slices_by_mask() -> bool:
    """Whether this transformers' models take a boolean ``(batch, seq)`` ``logits_to_keep`` (newer versions)."""
    from transformers import modeling_utils
    return hasattr(modeling_utils, "slice_logits_to_keep")


def _prefix_cache(model, prefix: list[int], dev: torch.device) -> tuple[str, Any] | None:
    """The KV cache of the prompts' shared ``prefix`` (one row) and the forward argument that takes it; None when
    there is none or the model's forward takes no cache."""
    key = _cache_kwarg(model)
    if not prefix or not forward_takes(model, key):
        return None
    keep = {"logits_to_keep": 1} if keeps_logits(model) else {}
    out = model(input_ids=torch.tensor([prefix], device=dev), use_cache=True, **keep)
    return key, getattr(out, key)


def _packed_logits(model, rows: list[list[_Question]], pad: int, dev: torch.device,
                   prefix: tuple[str, Any] | None = None, shared: int = 0) -> torch.Tensor:
    """Logits ``(N, V)`` at every scored index of ``rows`` (row by row, question by question), from one forward
    pass under a block attention mask: a token sees the ``shared`` tokens of the ``prefix`` cache, its own
    question's prompt and its own block."""
    width = max(sum(len(q.tokens) for q in r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    owner = torch.full((len(rows), width), -1, dtype=torch.long)  # question number in its row; -1: padding
    block = torch.full((len(rows), width), -1, dtype=torch.long)
    keep = torch.zeros((len(rows), width), dtype=torch.bool)
    for r, row in enumerate(rows):
        at = 0
        for n, q in enumerate(row):
            end = at + len(q.tokens)
            ids[r, at:end], pos[r, at:end] = torch.tensor(q.tokens), torch.tensor(q.positions)
            owner[r, at:end], block[r, at:end] = n, torch.tensor(q.blocks)
            keep[r, [at + i for i, _, _ in q.scored]] = True
            at = end
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    sees = (owner[:, :, None] == owner[:, None, :]) & causal & ((block[:, None, :] == -1)
                                                                | (block[:, :, None] == block[:, None, :]))
    sees = torch.cat([torch.ones(len(rows), width, shared, dtype=torch.bool), sees], dim=2)
    dtype = getattr(model, "dtype", None) or next(model.parameters()).dtype
    mask = torch.zeros(sees.shape, dtype=dtype).masked_fill_(~sees, torch.finfo(dtype).min)[:, None]
    kwargs: dict[str, Any] = {"use_cache": False}
    if prefix is not None:
        cache = copy.deepcopy(prefix[1])
        cache.batch_repeat_interleave(len(rows))
        kwargs = {"use_cache": True, prefix[0]: cache}
    slice_keep = keeps_logits(model) and _slices_by_mask()
    if slice_keep:
        kwargs["logits_to_keep"] = keep.to(dev)
    out = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev), **kwargs)
    return out.logits if slice_keep else out.logits[keep.to(dev)]


@torch.no_grad()
def choice_logliks(model, tok, examples: list[dict], chat: bool, max_length: int, batch_size: int, *,
                   bos: bool = True, target_delimiter: str = "") -> list[list[float]]:
    """Summed log-likelihood of each ``target_delimiter + choice``. Each question is one packed sequence: its
    prompt, whose last position scores every choice's first token (all of a one-token choice), then each longer
    choice under a block mask; questions are sorted by length and packed ``batch_size`` rows to a pass
    (docs/lm-eval.md, "Speed")."""
    dev = next(model.parameters()).device
    pad = _pad_id(tok)
    prompts = [encode_pair(tok, e["prompt"], "", chat, max_length, eos=False, bos=bos)[0] for e in examples]
    prefix = _shared_prefix(prompts)
    cache = _prefix_cache(model, prefix, dev)
    shared = len(prefix) if cache is not None else 0
    questions = [_layout(p[shared:], [tok(target_delimiter + c, add_special_tokens=False)["input_ids"] or [pad]
                                      for c in e["choices"]], shared) for p, e in zip(prompts, examples)]
    result: list[list[float]] = [[0.0] * len(e["choices"]) for e in examples]
    for rows in _pack([len(q.tokens) for q in questions], batch_size):
        logits = _packed_logits(model, [[questions[i] for i in r] for r in rows], pad, dev, cache, shared).float()
        index, tokens, where, base = [], [], [], 0
        for i in (i for r in rows for i in r):
            q = questions[i]
            kept = sorted({s for s, _, _ in q.scored})
            at = {s: base + n for n, s in enumerate(kept)}
            index += [at[s] for s, _, _ in q.scored]
            tokens += [t for _, t, _ in q.scored]
            where += [(i, k) for _, _, k in q.scored]
            base += len(kept)
        index_t = torch.tensor(index, device=logits.device)
        lp = logits[index_t, torch.tensor(tokens, device=logits.device)] - torch.logsumexp(logits, -1)[index_t]
        for (i, k), x in zip(where, lp.tolist()):
            result[i][k] += x
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
