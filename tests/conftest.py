"""Shared fixtures and helpers: the tiny test stream, a tiny random Llama, interrupting and comparing runs."""
from __future__ import annotations

import json
import os
import socket
import sys
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator

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
               tie: bool = False, tok=None, positions: int = 64):
    """A seeded random Llama, small enough for unit tests, over ``tok`` (default: tiny-synthetic's character
    tokenizer): (model, tok)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from clsuite.benchmarks.models.tiny_synthetic import make_tokenizer
    tok = tok if tok is not None else make_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=positions,
                      tie_word_embeddings=tie, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg), tok


CLOCK = {"wall_seconds", "train_seconds", "eval_seconds", "sharpness_seconds", "hook_seconds",
         "provenance", "peak_memory_bytes"}  # provenance: argv; measured memory varies from run to run


def comparable(path: Path) -> dict:
    """A record without its wall-clock fields and provenance."""
    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in CLOCK}
        return [strip(v) for v in x] if isinstance(x, list) else x
    return strip(json.loads(path.read_text()))


class Killed(Exception):
    """Stands for a kill right after the first experience's checkpoint."""


def interrupt_after_first(monkeypatch, stream, cfg, out) -> Path:
    """Run ``cfg`` until the checkpoint after experience 0 is written, then stop it; returns the checkpoint."""
    from clsuite import runner
    from clsuite.checkpoint import META
    from clsuite.records import record_path
    real = runner.save_checkpoint

    def save_then_die(path, ctx, result):
        real(path, ctx, result)
        raise Killed

    monkeypatch.setattr(runner, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        runner.run_one(stream, cfg, out, progress=False)
    monkeypatch.setattr(runner, "save_checkpoint", real)
    ckpt = record_path(out, cfg).with_suffix(".ckpt")
    assert json.loads((ckpt / META).read_text())["experience"] == 0
    assert not record_path(out, cfg).exists()
    return ckpt


@pytest.fixture
def cli(monkeypatch, capsys):
    """clsuite's real entry point in-process, with main()'s exit codes (CliRunner would bypass them):
    ``cli(*args) -> (exit code, stdout, stderr)``."""
    from clsuite.cli import main

    def call(*args) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["clsuite", *map(str, args)])
        with pytest.raises(SystemExit) as e:
            main()
        out = capsys.readouterr()
        return e.value.code, out.out, out.err
    return call


def tiny_runs(cli, store, strategies: str, seeds: str) -> "Path":
    """Real records of the tiny test stream (2 steps) under ``store/runs``, made once per ``store``."""
    out = store / "runs"
    if not (store / "made").exists():
        code, _, err = cli("run", "--stream", TINY_STREAM, "--strategies", strategies, "--seeds", seeds,
                           "--set", "steps=2", "--out", out, "--quiet")
        assert code == 0, err
        (store / "made").touch()
    return out


@contextmanager
def gloo_group(rank: int, port: int, world: int) -> Iterator[None]:
    """This process as ``rank`` of a gloo group of ``world`` on localhost, one thread (a short timeout: a rank that
    stops joining collectives fails the test instead of hanging it)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=180))
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


def spawn_ranks(worker: Callable[[int, int, str], None], tmp: Path, world: int) -> list[Any]:
    """Run ``worker(rank, port, str(tmp))`` in ``world`` processes; each saves ``tmp/result{rank}.pt``, returned
    here in rank order."""
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(port, str(tmp)), nprocs=world, join=True)
    return [torch.load(tmp / f"result{r}.pt", weights_only=False) for r in range(world)]


def assert_like_one_process(a: dict, b: dict, one: dict, label: str, tol: float) -> None:
    """Two ranks' results ``a``, ``b`` (weights before every step and after each experience, loss curves) against one
    process's ``one``: the ranks identical, within ``tol`` of one process, and the first step moved the weights."""
    def max_diff(x: list[torch.Tensor], y: list[torch.Tensor]) -> float:
        assert len(x) == len(y)
        return max(float((s - t).abs().max()) for s, t in zip(x, y))
    assert all(torch.equal(x, y) for x, y in zip(a["weights"], b["weights"]))
    diff = max_diff(a["weights"], one["weights"])
    print(f"\n{label}: max |w - w_single| = {diff:.3g}")
    assert diff < tol and max_diff(a["weights"][1:2], one["weights"][:1]) > 1e-4
    for la, lo in zip(a["loss_curves"], one["loss_curves"]):
        assert la == pytest.approx(lo, rel=1e-5)
