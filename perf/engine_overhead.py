"""Step-time overhead of the clsuite engine against a hand-written PyTorch loop, same model and batches.

Both loops tokenize the same examples, run forward/backward, clip and step AdamW. They alternate in
rounds so machine noise hits both alike; the ratio of the medians is printed. Target: <= 1.05.

    python perf/engine_overhead.py [--steps 30] [--rounds 5]
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from clsuite.benchmarks.builders.tiny_synthetic import tiny_task
from clsuite.benchmarks.models.tiny_synthetic import make_tokenizer
from clsuite.config import RunConfig, TrainConfig
from clsuite.data import collate, lm_loss
from clsuite.engine import Context, train_experience
from clsuite.streams import Stream, Task


def build(tok, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return LlamaForCausalLM(cfg)


def hand_loop(model, tok, batches, lr: float) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    t0 = time.perf_counter()
    for examples in batches:
        loss = lm_loss(model, collate(tok, examples, False, 48))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        float(loss.detach())
    return time.perf_counter() - t0


def engine_loop(model, tok, batches, lr: float) -> float:
    rows = [e for b in batches for e in b]
    task = Task("t", rows, None, "exact_match")
    cfg = RunConfig(stream="perf", train=TrainConfig(lr=lr, steps=len(batches), batch_size=len(batches[0]),
                                                     max_length=48, max_grad_norm=1.0))
    ctx = Context(model, tok, Stream("perf", [task], [], "none"), cfg, [], random.Random(0), experience=0, task=task)
    t0 = time.perf_counter()
    train_experience(ctx, progress=False)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    tok = make_tokenizer()
    # Equal-length rows, so the engine's shuffled batches hold exactly as many tokens as the hand loop's.
    data = [r for r in tiny_task(seed=0, skill="sorting", n_train=20000)["train"] if len(r["target"]) == 4]
    data = data[:args.steps * args.batch]
    batches = [data[i:i + args.batch] for i in range(0, len(data), args.batch)]
    model = build(tok)
    n = sum(p.numel() for p in model.parameters())
    hand, eng = [], []
    hand_loop(model, tok, batches[:3], 1e-4)  # warm-up
    for _ in range(args.rounds):
        hand.append(hand_loop(model, tok, batches, 1e-4))
        eng.append(engine_loop(model, tok, batches, 1e-4))
    h, e = statistics.median(hand), statistics.median(eng)
    print(f"model: {n / 1e6:.2f}M parameters, {args.steps} steps x batch {args.batch}, {args.rounds} rounds, "
          f"{torch.get_num_threads()} threads")
    print(f"hand-written loop: {h / args.steps * 1e3:.1f} ms/step (median)")
    print(f"clsuite engine:    {e / args.steps * 1e3:.1f} ms/step (median)")
    print(f"overhead ratio (engine / hand): {e / h:.3f}  (target <= 1.05)")


if __name__ == "__main__":
    main()
