"""Shared fixtures: a private model cache per test session (the tiny base model is built once), the tiny test stream."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

TINY_STREAM = str(Path(__file__).parent / "data" / "tiny-test.yaml")

# Tiny tensors: one thread is fastest, gives the same float sums as the one-thread subprocesses some tests start,
# and does not crawl when the cores are shared (two threads on a busy 2-core machine ran up to 40x slower).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_stream_path() -> str:
    return TINY_STREAM


@pytest.fixture(scope="session")
def tiny_stream():
    from clsuite.streams import load_stream
    return load_stream(TINY_STREAM)


def tiny_llama(seed: int = 0, hidden: int = 16, layers: int = 1, heads: int = 2, kv_heads: int = 2,
               tie: bool = False):
    """A seeded random Llama over tiny-synthetic's character tokenizer, small enough for unit tests: (model, tok)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from clsuite.benchmarks.tiny_synthetic import make_tokenizer
    tok = make_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=64,
                      tie_word_embeddings=tie, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg), tok
