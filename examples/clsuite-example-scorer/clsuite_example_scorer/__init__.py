"""An example clsuite plugin: a scorer (teacher-forced token accuracy) and a data builder (letter shifting)."""
from __future__ import annotations

import random
import string

import torch
from datasets import Dataset

from clsuite.data import collate
from clsuite.scoring import register_scorer
from clsuite.streams import data_builder

__all__ = ["letter_shift", "token_accuracy"]


@register_scorer("token_accuracy", higher_is_better=True)
@torch.no_grad()
def token_accuracy(model, tok, examples: list[dict], chat: bool, max_length: int,
                   batch_size: int) -> dict[str, float]:
    """Teacher-forced next-token accuracy over the target tokens (end of sequence included), pooled over examples."""
    dev = next(model.parameters()).device
    hits = total = 0
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(dev) for k, v in collate(tok, examples[i:i + batch_size], chat, max_length).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        keep = labels != -100
        hits += int((logits.argmax(-1) == labels)[keep].sum())
        total += int(keep.sum())
    return {"score": hits / total}


@data_builder("letter_shift")
def letter_shift(seed: int, shift: int = 1, length: int = 3, n_train: int = 200,
                 n_eval: int = 50) -> dict[str, Dataset]:
    """Move every letter ``shift`` places along the alphabet (``shift abc>`` -> ``bcd``); disjoint train/eval prompts."""
    letters = string.ascii_lowercase
    if 26 ** length < n_train + n_eval:
        raise ValueError(f"only {26 ** length} distinct words of length {length}: ask for fewer rows or longer words")
    rng = random.Random(f"letter-shift-{seed}")
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < n_train + n_eval:
        w = "".join(rng.choice(letters) for _ in range(length))
        if w not in seen:
            seen.add(w)
            words.append(w)

    def rows(ws: list[str]) -> Dataset:
        return Dataset.from_dict({"prompt": [f"shift {w}>" for w in ws],
                                  "target": ["".join(letters[(letters.index(c) + shift) % 26] for c in w) for w in ws]})

    return {"train": rows(words[n_eval:]), "eval": rows(words[:n_eval])}
