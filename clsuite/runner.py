"""One run = (stream, strategy spec, seed): build everything, run the stream, write the record atomically."""
from __future__ import annotations

import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import pydantic

from . import distributed as dist
from .checkpoint import has_checkpoint, load_checkpoint, remove_checkpoint, restore_checkpoint, save_checkpoint
from .config import RunConfig, TrainConfig, EvalConfig, validated
from .engine import Context, run_stream, set_seed
from .errors import DivergenceError, UserError
from .evalcache import cache_path, initial_key, load_initial, save_initial
from .metrics import compute_metrics
from .models import load_model
from .provenance import provenance
from .records import SCHEMA_VERSION, atomic_write_json, read_record, slug
from .strategy import build_strategy, canonical_spec
from .streams import Stream


def resolve_config(stream: Stream, strategy: str, seed: int, model: str | None = None,
                   train: dict[str, Any] | None = None, eval: dict[str, Any] | None = None) -> RunConfig:
    """The stream's defaults overlaid with the caller's settings, validated."""
    tc = validated(TrainConfig, {**stream.train, **(train or {})}, f"training settings of stream {stream.name}")
    ec = validated(EvalConfig, {**stream.eval, **(eval or {})}, f"evaluation settings of stream {stream.name}")
    return RunConfig(stream=stream.name, strategy=canonical_spec(strategy), seed=seed,
                     model=model or stream.model, train=tc, eval=ec)


def record_path(out: Path, cfg: RunConfig, tag: str = "") -> Path:
    """``out/<stream>/<strategy>/[<tag>/]seed<k>.json``; a sweep cell's ``tag`` names its hyper-parameters."""
    base = Path(out) / slug(cfg.stream) / slug(cfg.strategy)
    return (base / slug(tag) if tag else base) / f"seed{cfg.seed}.json"


def save_model(model: Any, tokenizer: Any, dest: Path) -> Path:
    """``save_pretrained`` the model (a PEFT adapter merged first) and tokenizer into ``dest``, atomically."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        PeftModel = ()
    if isinstance(model, PeftModel):
        model = model.merge_and_unload()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def run_one(stream: Stream, cfg: RunConfig, out: Path, progress: bool = True, force: bool = False,
            save: bool = False, tag: str = "", resume: bool = False) -> Path:
    """Run one cell and write its record; an existing complete record for the same config is kept (resumable).
    ``save``: also write the final model to ``seed<k>.model/`` beside the record (``clsuite landscape --checkpoint``).
    After each experience but the last the run's state goes to ``seed<k>.ckpt/`` (``clsuite.checkpoint``), deleted
    once the record is written; ``resume`` continues from it. Without ``resume`` an existing checkpoint is an error (``force``:
    it is discarded).
    Under torchrun every rank trains (``clsuite.distributed``); rank 0 alone evaluates and writes."""
    dist.init_from_env()
    dist.check_batch(cfg.train.batch_size, cfg.train.grad_accum)  # before the first evaluation, not after it
    progress = progress and dist.is_main()
    path = record_path(out, cfg, tag)
    model_dir = path.with_suffix(".model")
    ckpt_dir = path.with_suffix(".ckpt")
    if path.exists() and not force:
        old = read_record(path)
        try:  # validated, so settings added to clsuite since that run compare at their defaults
            same = RunConfig.model_validate(old.config) == cfg
        except pydantic.ValidationError:
            same = False
        if not same:
            raise UserError(f"{path} holds a run with other settings; use another --out or --force to replace it")
        if old.status == "complete" and (model_dir.exists() or not save):
            if progress:
                print(f"skip {cfg.strategy} seed {cfg.seed}: already recorded in {path}")
            if dist.is_main():  # left by a kill between writing the record and deleting the checkpoint
                remove_checkpoint(ckpt_dir)
            return path
    ckpt = None
    if has_checkpoint(ckpt_dir):
        if resume:
            ckpt = load_checkpoint(ckpt_dir, cfg, stream)
        elif not force:
            raise UserError(f"{ckpt_dir} holds an interrupted run of this cell: add --resume to continue it, "
                            "or --force to start it over")
        elif dist.is_main():
            remove_checkpoint(ckpt_dir)
    set_seed(cfg.seed)
    plugins = build_strategy(cfg.strategy)
    t0 = time.perf_counter()
    with dist.main_first():  # a model built and cached on first use is built once
        model, tok = load_model(cfg.model)
    model.to(dist.device())  # this rank's GPU under nccl, the CPU under gloo; one process: the GPU if any
    ctx = Context(model, tok, stream, cfg, plugins, random.Random(cfg.seed))
    record: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION, "status": "complete", "stream": cfg.stream, "strategy": cfg.strategy,
        "seed": cfg.seed, "model": cfg.model, "config": cfg.model_dump(),
        "tasks": [t.name for t in stream.tasks], "probes": [p.name for p in stream.probes],
        "probe_categories": {p.name: p.category for p in stream.probes},
        **({"tag": tag} if tag else {}),  # a sweep cell's hyper-parameters: its own leaderboard row
    }
    cache = None  # row 0 is shared by every strategy and seed: evaluated once per weights and eval settings
    if ckpt is None and dist.is_main():
        cache = cache_path(out, cfg.stream, initial_key(model, tok, stream, cfg.eval))

    def checkpoint(result: dict[str, Any]) -> None:  # not after the last experience: the record follows at once
        if dist.is_main() and len(result["experiences"]) < len(stream.tasks):
            save_checkpoint(ckpt_dir, ctx, result)

    try:
        result = run_stream(ctx, progress, initial=load_initial(cache) if cache else None,
                            on_row=lambda i, row: save_initial(cache, row) if cache and i == 0 else None,
                            after_experience=checkpoint,
                            restore=(lambda c: restore_checkpoint(c, ckpt)) if ckpt is not None else None)
    except DivergenceError as e:
        record.update(status="failed", error=str(e), R=[], P=[], metrics={}, provenance=provenance(),
                      wall_seconds=time.perf_counter() - t0)
        if dist.is_main():
            atomic_write_json(path, record)
            remove_checkpoint(ckpt_dir)
        raise
    if not dist.is_main():
        return path
    rows = result["rows"]
    R = [[r["tasks"][t]["score"] for t in record["tasks"]] for r in rows]
    P = [[r["probes"][p]["score"] for p in record["probes"]] for r in rows]
    scored = [p for p in record["probes"] if all("gold_loglik" in r["probes"][p] for r in rows)]
    L = [[r["probes"][p]["gold_loglik"] for p in scored] for r in rows] if scored else None
    steps = sum(e["steps"] for e in result["experiences"])  # per experience: fixed, or from epochs
    record.update(
        R=R, P=P, metrics=compute_metrics(R, P, L), details=rows, experiences=result["experiences"],
        cost={"compute_multiplier": ctx.example_passes / (steps * cfg.train.batch_size),
              "extra_memory_bytes": sum(p.extra_memory_bytes() for p in plugins),
              # what the optimizer trained (largest over experiences): after lora(mode=merge) the model holds
              # no adapter any more, so counting ctx.trainable_parameters() after the run would be wrong
              "trainable_parameters": max(e["trainable_parameters"] for e in result["experiences"]),
              "parameters": sum(p.numel() for p in ctx.model.parameters())},
        provenance=provenance(), wall_seconds=time.perf_counter() - t0)
    if save:  # before the record, so a complete record never points at a missing model
        record["model_dir"] = save_model(ctx.model, tok, model_dir).name
    atomic_write_json(path, record)
    remove_checkpoint(ckpt_dir)  # after the record: a kill in between leaves a checkpoint, never neither
    return path
