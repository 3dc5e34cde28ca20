"""``tiny-synthetic``: a tiny character-level Llama, pre-trained on a general mix, then taught distinct skills.

Everything is generated procedurally and seeded, so the stream runs offline in about a minute. The base
model is trained once per configuration and cached (safetensors) under ``cache_dir()``.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import string
import tempfile
from typing import Callable

import torch
from datasets import Dataset

from clsuite.models import MODELS, cache_dir
from clsuite.streams import data_builder

CHARS = string.digits + string.ascii_lowercase + " +-=:,;?|>"
LETTERS = "abcdefghij"  # the tasks' alphabet: small, so a tiny model learns them in a few dozen steps
MODEL_CONFIG = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=4, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=True)
PRETRAIN = dict(steps=800, batch_size=64, lr=3e-3, seed=0, n_per_skill=4000)


def _word(rng: random.Random, lo: int = 2, hi: int = 5, alphabet: str = LETTERS) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))


# --- general skills (pre-training mix; their held-out items are the probes) -----------------------------
def _copy(rng):
    w = _word(rng, 2, 6, string.ascii_lowercase)
    return f"copy {w}:", w


def _succ(rng):
    w = _word(rng, 1, 4, string.ascii_lowercase[:-1])
    return f"next {w}:", "".join(chr(ord(c) + 1) for c in w)


def _maxd(rng):
    ds = [str(rng.randint(0, 9)) for _ in range(rng.randint(2, 5))]
    return f"max {' '.join(ds)}:", max(ds)


def _count(rng):
    w = _word(rng, 1, 9, string.ascii_lowercase)
    return f"len {w}:", str(len(w))


GENERAL: dict[str, Callable] = {"copy": _copy, "next": _succ, "max": _maxd, "count": _count}


# --- the stream's tasks: distinct skills -----------------------------------------------------------------
def _add(rng):
    a, b = rng.randint(0, 49), rng.randint(0, 9)
    return f"{a}+{b}=", str(a + b)


def _rev(rng):
    w = _word(rng, 2, 4)
    return f"rev {w}:", w[::-1]


def _sort(rng):
    w = _word(rng, 2, 4)
    return f"sort {w}:", "".join(sorted(w))


def _recall(rng):
    keys = rng.sample(LETTERS, 2)
    vals = [str(rng.randint(0, 9)) for _ in keys]
    q = rng.randrange(2)
    return ",".join(f"{k}={v}" for k, v in zip(keys, vals)) + f";{keys[q]}?", vals[q]


_CIPHER = dict(zip(LETTERS, "qwertyuiop"))


def _cipher(rng):
    w = _word(rng, 2, 4)
    return f"enc {w}:", "".join(_CIPHER[c] for c in w)


TASKS: dict[str, Callable] = {"addition": _add, "reversal": _rev, "sorting": _sort, "recall": _recall,
                              "cipher": _cipher}


def _unique(gen: Callable, rng: random.Random, n: int, exclude: set[str] = frozenset()) -> list[tuple[str, str]]:
    seen, out = set(exclude), []
    for _ in range(50 * n):
        p, t = gen(rng)
        if p not in seen:
            seen.add(p)
            out.append((p, t))
            if len(out) == n:
                break
    return out


def _rows(pairs: list[tuple[str, str]]) -> Dataset:
    return Dataset.from_dict({"prompt": [p for p, _ in pairs], "target": [t for _, t in pairs]})


@data_builder("tiny_task")
def tiny_task(seed: int, skill: str, n_train: int = 2000, n_eval: int = 100) -> dict[str, Dataset]:
    """Train/eval splits of one task skill (addition, reversal, sorting, recall, cipher), disjoint prompts."""
    rng = random.Random(f"{skill}-{seed}")
    ev = _unique(TASKS[skill], rng, n_eval)
    return {"train": _rows(_unique(TASKS[skill], rng, n_train, {p for p, _ in ev})), "eval": _rows(ev)}


@data_builder("tiny_general")
def tiny_general(seed: int, skill: str, n_eval: int = 100) -> dict[str, Dataset]:
    """Held-out items of a pre-training skill; the pre-training mix never contains them."""
    return {"eval": _rows(_general_split(skill, seed)[1][:n_eval])}


def _general_split(skill: str, seed: int) -> tuple[list, list]:
    rng = random.Random(f"general-{skill}-{seed}")
    held = _unique(GENERAL[skill], rng, 200)
    return _unique(GENERAL[skill], rng, PRETRAIN["n_per_skill"], {p for p, _ in held}), held


@data_builder("tiny_general_mix")
def tiny_general_mix(seed: int, n: int = 500) -> dict[str, Dataset]:
    """Pre-training examples (not the probes), for rehearsal of general data."""
    rng = random.Random(f"mix-{seed}")
    pool = [pair for s in GENERAL for pair in _general_split(s, 0)[0]]
    return {"train": _rows(rng.sample(pool, n))}


def make_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    special = ["<pad>", "<s>", "</s>", "<unk>"]
    tk = Tokenizer(models.WordLevel({t: i for i, t in enumerate(special + list(CHARS))}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def _pretrain(path: str) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM
    from clsuite.data import collate, lm_loss
    from tqdm import tqdm
    tok = make_tokenizer()
    torch.manual_seed(PRETRAIN["seed"])
    cfg = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, **MODEL_CONFIG)
    model = LlamaForCausalLM(cfg)
    pool = [{"prompt": p, "target": t} for s in GENERAL for p, t in _general_split(s, 0)[0]]
    rng = random.Random(PRETRAIN["seed"])
    opt = torch.optim.AdamW(model.parameters(), lr=PRETRAIN["lr"], weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, PRETRAIN["lr"], total_steps=PRETRAIN["steps"], pct_start=0.1)
    for _ in tqdm(range(PRETRAIN["steps"]), desc="pre-training tiny-synthetic base", unit="step"):
        loss = lm_loss(model, collate(tok, rng.sample(pool, PRETRAIN["batch_size"]), False, 64))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)


def base_model_dir() -> str:
    """The cached pre-trained base model, built on first use; the key hashes every setting that shapes it."""
    key = hashlib.sha256(json.dumps([MODEL_CONFIG, PRETRAIN, CHARS, sorted(GENERAL)], sort_keys=True).encode())
    final = cache_dir() / f"tiny-synthetic-{key.hexdigest()[:16]}"
    if not (final / "config.json").exists():
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=final.parent, prefix=".building-")
        try:
            _pretrain(tmp)
            os.replace(tmp, final)  # atomic: a killed build never leaves a half-written model
        except OSError:
            if not (final / "config.json").exists():
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(final)


@MODELS.decorator("tiny-synthetic-base")
def tiny_base():
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = base_model_dir()
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
