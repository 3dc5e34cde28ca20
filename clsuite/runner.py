"""One run = (stream, strategy spec, seed): build everything, run the stream, write the record atomically."""
from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

from . import distributed as dist
from . import sharding
from .atomic import DiskFullError, write_dir, write_json
from .checkpoint import Checkpoint, has_checkpoint, load_checkpoint, remove_checkpoint, restore_checkpoint, save_checkpoint
from .config import RunConfig
from .engine import Context, RunHooks, run_stream, set_seed
from .errors import DivergenceError, UserError
from .evalcache import cache_path, initial_key, load_initial, save_initial, weights_digest
from .fingerprint import FingerprintMismatch, describe, stale_parts
from .memory import prepare_model
from .models import load_model
from .provenance import provenance
from .records import cell_fingerprint, failed_record, fill_record, new_record, read_record, record_path
from .strategy import build_strategy
from .streams import Stream, for_split, in_order


def save_model(model: Any, tokenizer: Any, dest: Path) -> Path:
    """``save_pretrained`` the model (a PEFT adapter merged first) and tokenizer into ``dest``, atomically."""
    from peft import PeftModel
    if isinstance(model, PeftModel):
        model = model.merge_and_unload()

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    write_dir(dest, fill)
    return dest


def _recorded(path: Path, cfg: RunConfig, save: bool, fp: dict[str, str]) -> bool:
    """Whether ``path`` already holds this cell's complete record (and its saved model when ``save``); a record of
    another fingerprint (fingerprint ``fp``) is a FingerprintMismatch naming the parts that differ."""
    if not path.exists():
        return False
    old = read_record(path)
    if old.fingerprint is None:
        raise UserError(f"{path} was made before records had fingerprints (schema v{old.schema_version}), so "
                        "nothing shows what data it was made with: re-run it with --force")
    parts = stale_parts(old.fingerprint, old.config, fp, old.seed != cfg.seed)  # new settings at their defaults
    if parts:
        raise FingerprintMismatch(f"{path} was made with other {describe(parts)}: re-run with --force, or remove "
                                  "it (or use another --out)", parts)
    return old.status == "complete" and (path.with_suffix(".model").exists() or not save)


def _checkpoint(ckpt_dir: Path, cfg: RunConfig, stream: Stream, resume: bool, force: bool,
                fp: dict[str, str]) -> Checkpoint | None:
    """The checkpoint to resume from, if any; an interrupted run without --resume or --force is an error."""
    if not has_checkpoint(ckpt_dir):
        return None
    if resume:
        return load_checkpoint(ckpt_dir, cfg, stream, fp)
    if not force:
        raise UserError(f"{ckpt_dir} holds an interrupted run of this cell: add --resume to continue it, "
                        "or --force to start it over")
    if dist.is_main():
        remove_checkpoint(ckpt_dir)
    return None


def _cost(ctx: Context, result: dict[str, Any]) -> dict[str, Any]:
    steps = sum(e["steps"] for e in result["experiences"])  # per experience: fixed, or from epochs
    return {"compute_multiplier": ctx.example_passes / (steps * ctx.config.train.batch_size),
            "extra_memory_bytes": sum(p.extra_memory_bytes() for p in ctx.plugins),
            "peak_memory_bytes": max((b for e in result["experiences"] for b in e.get("peak_memory_bytes") or []
                                      if b is not None), default=None),  # training, over processes (docs/memory.md)
            # what the optimizer trained (largest over experiences): after lora(mode=merge) the model holds
            # no adapter any more, so counting ctx.trainable_parameters() after the run would be wrong
            "trainable_parameters": max(e["trainable_parameters"] for e in result["experiences"]),
            "parameters": sum(p.numel() for p in ctx.model.parameters()),
            **{k: v for p in ctx.plugins for k, v in p.cost_report().items()}}


def run_one(stream: Stream, cfg: RunConfig, out: Path, progress: bool = True, force: bool = False,
            save: bool = False, tag: str = "", resume: bool = False) -> Path:
    """Run one cell and write its record; an existing complete record of the same cell is kept (resumable).
    ``save``: also write the final model to ``seed<k>.model/``; ``resume``: continue from ``seed<k>.ckpt/``, the
    state after the last finished experience (docs/resume.md). Under torchrun every rank trains, rank 0 evaluates
    and writes."""
    dist.init_from_env()
    stream = in_order(for_split(stream, cfg.eval.split), cfg.seed)  # what is trained, scored and fingerprinted
    dist.check_batch(cfg.train.batch_size, cfg.train.grad_accum)  # before the first evaluation, not after it
    progress = progress and dist.is_main()
    path = record_path(out, cfg, tag)
    ckpt_dir = path.with_suffix(".ckpt")
    fp = cell_fingerprint(cfg, stream)
    if not force and _recorded(path, cfg, save, fp):
        if progress:
            print(f"skip {cfg.strategy} seed {cfg.seed}: already recorded in {path}")
        if dist.is_main():  # left by a kill between writing the record and deleting the checkpoint
            remove_checkpoint(ckpt_dir)
        return path
    ckpt = _checkpoint(ckpt_dir, cfg, stream, resume, force, fp)
    set_seed(cfg.seed)
    plugins = build_strategy(cfg.strategy)
    sharding.check(cfg, plugins, save)  # parallel=fsdp: before anything is loaded or evaluated
    t0 = time.perf_counter()
    with dist.main_first():  # a model built and cached on first use is built once
        model, tok = load_model(cfg.model)
    prepare_model(model, cfg.train)  # bf16 weights, activation checkpointing: before row 0 and its cache key
    base = weights_digest(model) if dist.is_main() else None  # recorded: a model built on first use may differ by machine
    if not sharding.sharded(cfg):  # under fsdp, fully_shard moves each rank's shards there
        model.to(dist.device())  # this rank's GPU under nccl, the CPU under gloo; one process: the GPU if any
    ctx = Context(model, tok, stream, cfg, plugins, random.Random(cfg.seed))
    record = new_record(cfg, stream, tag, fp)
    cache = None  # row 0 is shared by every strategy and seed: evaluated once per weights and eval settings
    if ckpt is None and dist.is_main():
        cache = cache_path(out, cfg.stream, initial_key(model, tok, stream, cfg.eval, base))

    def checkpoint(result: dict[str, Any]) -> None:  # not after the last experience: the record follows at once
        if len(result["experiences"]) < len(stream.tasks):  # rank 0 writes; a failure there reaches every rank
            # under fsdp every rank writes its shards, rank 0 the rest
            (dist.everywhere if sharding.sharded(cfg) else dist.on_main)(lambda: save_checkpoint(ckpt_dir, ctx, result))

    hooks = RunHooks(initial=load_initial(cache) if cache else None,
                     on_row=lambda i, row: save_initial(cache, row) if cache and i == 0 else None,
                     after_experience=checkpoint,
                     restore=(lambda c: restore_checkpoint(c, ckpt)) if ckpt is not None else None)

    def write(done: dict[str, Any]) -> None:  # rank 0's: the record, then the checkpoint goes (never neither)
        write_json(path, {**done, "world_size": dist.world_size(), **sharding.record_fields(cfg),
                          "provenance": {**provenance(), "base_weights": base}, "wall_seconds": time.perf_counter() - t0})
        remove_checkpoint(ckpt_dir)

    def finish(result: dict[str, Any]) -> None:
        done = fill_record(record, result, _cost(ctx, result))
        if save:  # before the record, so a complete record never points at a missing model
            done["model_dir"] = save_model(ctx.model, tok, path.with_suffix(".model")).name
        write(done)

    try:
        try:
            result = run_stream(ctx, progress, hooks)
        except DivergenceError as e:  # raised on every rank alike (distributed.agree); rank 0 records it
            error = str(e)
            dist.on_main(lambda: write(failed_record(record, error)))
            raise
        dist.on_main(lambda: finish(result))
    except DiskFullError as e:  # the checkpoint and finished records stay: a restart continues
        e.cell = cell_name(cfg, tag)
        raise
    return path


def cell_name(cfg: RunConfig, tag: str = "") -> str:
    """A cell as ``stream/strategy[/tag]/seed<k>``, the way its record path reads."""
    split = "" if cfg.eval.split == "test" else f".{cfg.eval.split}"
    return "/".join([cfg.stream, cfg.strategy, *([tag] if tag else []), f"seed{cfg.seed}{split}"])
