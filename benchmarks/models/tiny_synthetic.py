"""The ``tiny-synthetic-base`` model: a tiny character-level Llama pre-trained on the general skills' mix.

It is trained once per configuration and cached (safetensors) under ``cache_dir()``.
"""
from __future__ import annotations

import hashlib
import json
import random
import string
from pathlib import Path

import torch

from clsuite.atomic import write_dir
from clsuite.models import MODELS, cache_dir

from ..builders.tiny_synthetic import GENERAL, N_PER_SKILL, general_split

CHARS = string.digits + string.ascii_lowercase + " +-=:,;?|>"  # the tokenizer's vocabulary
MODEL_CONFIG = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=4, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=True)
PRETRAIN = dict(steps=800, batch_size=64, lr=3e-3, seed=0, n_per_skill=N_PER_SKILL)


def make_tokenizer():
    """The character-level tokenizer over ``CHARS`` plus <pad>, <s>, </s>, <unk>."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    special = ["<pad>", "<s>", "</s>", "<unk>"]
    tk = Tokenizer(models.WordLevel({t: i for i, t in enumerate(special + list(CHARS))}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def _pretrain(path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM
    from clsuite.data import collate, lm_loss
    from tqdm import tqdm
    tok = make_tokenizer()
    torch.manual_seed(PRETRAIN["seed"])
    cfg = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, **MODEL_CONFIG)
    model = LlamaForCausalLM(cfg)
    pool = [{"prompt": p, "target": t} for s in GENERAL for p, t in general_split(s, 0)[0]]
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
        # a folder without config.json is incomplete (left by hand or an old writer): replace it; otherwise a
        # process that finished first keeps its copy
        write_dir(final, _pretrain, replace=final.exists())
    return str(final)


@MODELS.decorator("tiny-synthetic-base")
def tiny_base():
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = base_model_dir()
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
