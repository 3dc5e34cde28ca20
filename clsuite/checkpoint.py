"""Per-experience checkpoints of a run (safetensors + JSON, no pickle), from which ``--resume`` continues; under
``parallel=fsdp`` one pair of safetensors files per process, of its shards (docs/resume.md)."""
from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from . import distributed as dist
from . import sharding
from .atomic import write_bytes, write_json
from .config import RunConfig
from .errors import UserError
from .fingerprint import FingerprintMismatch, describe, stale_parts
from .records import cell_fingerprint

if TYPE_CHECKING:
    from .engine import Context
    from .streams import Stream

FORMAT = 1
META = "checkpoint.json"
_TENSOR = "__tensor__"  # {"__tensor__": key}: a tensor of a plugin state, stored under key in the state file
_SHARD = "__shard_of__"  # beside it: the tensor is this process's shard of a DTensor of that global shape
_FIX = "delete it, or run with --force to start the run over"


@dataclass
class Checkpoint:
    """A checked checkpoint: its directory and JSON part (the tensors are read when it is restored)."""
    path: Path
    meta: dict[str, Any]


def has_checkpoint(path: Path) -> bool:
    """Whether ``path`` holds a committed checkpoint (a first write killed before its commit leaves none)."""
    return (Path(path) / META).is_file()


def remove_checkpoint(path: Path) -> None:
    """Delete the checkpoint directory ``path`` if there is one, its commit point first: a kill midway leaves no
    checkpoint rather than one that names deleted files."""
    if Path(path).exists():
        (Path(path) / META).unlink(missing_ok=True)
        shutil.rmtree(path)


def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors a checkpoint stores, by name (see the module docstring)."""
    from peft import PeftModel
    if isinstance(model, PeftModel):
        return {n: p for n, p in model.named_parameters() if p.requires_grad}
    persistent = model.state_dict(keep_vars=True).keys()
    return {**dict(model.named_parameters()), **{n: b for n, b in model.named_buffers() if n in persistent}}


def save_checkpoint(path: Path, ctx: Context, result: dict[str, Any]) -> None:
    """Write the state after experience ``ctx.experience`` to ``path``; ``result``: the engine's rows and logs. Under
    ``parallel=fsdp`` every rank calls it and writes its own shards; rank 0 then commits ``checkpoint.json``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    plugins = [{"name": p.name, "state": _split(p.state_dict(), tensors, f"plugin{i}", p.name)}
               for i, p in enumerate(ctx.plugins)]
    tensors["rng.torch"] = torch.get_rng_state()
    if ctx.device.type == "cuda":
        tensors.update((f"rng.cuda.{i}", s) for i, s in enumerate(torch.cuda.get_rng_state_all()))
    sharded = sharding.sharded(ctx.config)
    if sharded:  # one model file and one state file per rank, of its shards (and its torch random state)
        w = dist.world_size()
        files = {k: [f"exp{ctx.experience}.rank{r}.{k}.safetensors" for r in range(w)] for k in ("model", "state")}
        layout = {"sharded": {"world_size": w}}
    else:
        files = {"model": f"exp{ctx.experience}.model.safetensors", "state": f"exp{ctx.experience}.state.safetensors"}
        layout = {}
    np_state = np.random.get_state()
    meta = {"format": FORMAT, **_identity(ctx.config, ctx.stream), **layout, "experience": ctx.experience,
            "files": files, "rows": result["rows"], "experiences": result["experiences"],
            "example_passes": ctx.example_passes,
            "rng": {"python": _py_state(random.getstate()), "ctx": _py_state(ctx.rng.getstate()),
                    "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]},
            "plugins": plugins}
    names = _file_names(files)
    if sharded:
        _write_shards(path, {k: v[dist.rank()] for k, v in files.items()}, model_tensors(ctx.model), tensors)
        if not dist.is_main():
            return
    try:
        if not sharded:
            _write_tensors(path / files["model"], model_tensors(ctx.model))
            _write_tensors(path / files["state"], tensors)
        write_json(path / META, meta)
    except OSError:  # a write failed (a full disk): the previous checkpoint stays, without this one's files
        for name in names:
            (path / name).unlink(missing_ok=True)
        raise
    for f in path.iterdir():  # the previous experience's files, and temporary files of a killed write
        if f.name not in (META, *names):
            f.unlink()


def _file_names(files: dict[str, Any]) -> list[str]:
    """The tensor files a checkpoint's ``files`` names (a list per kind when sharded)."""
    return [n for v in files.values() for n in ([v] if isinstance(v, str) else v)]


def _write_shards(path: Path, mine: dict[str, str], model: dict[str, torch.Tensor],
                  tensors: dict[str, torch.Tensor]) -> None:
    """Every rank writes its model and state files, then waits for the others: when it returns, all are on disk
    (a rank's failure is raised on every rank)."""
    error = None
    try:
        _write_tensors(path / mine["model"], model)
        _write_tensors(path / mine["state"], tensors)
    except OSError as e:
        for name in mine.values():
            (path / name).unlink(missing_ok=True)
        error = e
    dist.agree(error)
    if error is not None:
        raise error


def load_checkpoint(path: Path, cfg: RunConfig, stream: Stream, fp: dict[str, str] | None = None) -> Checkpoint:
    """Read the checkpoint in ``path``; a UserError if it is unreadable, a FingerprintMismatch if it was written for
    another cell (``fp``: this cell's fingerprint, computed when not given)."""
    path = Path(path)
    try:
        meta = json.loads((path / META).read_text())
    except (ValueError, OSError, RecursionError) as e:
        raise UserError(f"checkpoint {path / META} cannot be read ({_first_line(e)}); {_FIX}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{path / META} is not a clsuite checkpoint of format {FORMAT}; {_FIX}")
    wrong = [k for k, t in _META_TYPES.items() if not isinstance(meta.get(k), t)]
    if wrong:
        raise UserError(f"checkpoint {path} is incomplete or damaged ({META} lacks a valid {wrong[0]!r}); {_FIX}")
    if "fingerprint" not in meta:
        raise UserError(f"checkpoint {path} was written before checkpoints had fingerprints; {_FIX}")
    _check_layout(path, meta, cfg)
    # the config part is recomputed from the stored config validated now: new settings compare at their defaults
    parts = stale_parts(meta["fingerprint"], meta["config"], fp or cell_fingerprint(cfg, stream),
                        meta["config"].get("seed") != cfg.seed)
    if parts:
        raise FingerprintMismatch(f"checkpoint {path} was made with other {describe(parts)}; {_FIX}", parts)
    return Checkpoint(path, meta)


def restore_checkpoint(ctx: Context, ckpt: Checkpoint) -> dict[str, Any]:
    """Load ``ckpt`` into ``ctx`` after ``before_training``: weights, plugin states, counters, random states.

    Returns the checkpoint's rows and per-experience logs (the engine's ``restore`` callback)."""
    try:
        return _restore(ctx, ckpt)
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, RuntimeError, OSError,
            SafetensorError) as e:  # a damaged file or JSON part; UserErrors (a mismatch) pass as they are
        raise UserError(f"checkpoint {ckpt.path} is incomplete or damaged ({type(e).__name__}: {_first_line(e)}); "
                        f"{_FIX}") from None


def _restore(ctx: Context, ckpt: Checkpoint) -> dict[str, Any]:
    meta = ckpt.meta
    mine = (lambda f: f[dist.rank()]) if "sharded" in meta else (lambda f: f)  # this rank's files, when sharded
    model = load_file(ckpt.path / mine(meta["files"]["model"]))
    tensors = load_file(ckpt.path / mine(meta["files"]["state"]))
    _load_model(ctx.model, model, ckpt.path)
    mesh = sharding.mesh_of(ctx.model)
    saved = [e["name"] for e in meta["plugins"]]
    if saved != [p.name for p in ctx.plugins]:
        raise UserError(f"checkpoint {ckpt.path} holds the states of plugins {saved}, this run has "
                        f"{[p.name for p in ctx.plugins]}; {_FIX}")
    for p, entry in zip(ctx.plugins, meta["plugins"]):
        p.load_state_dict(_join(entry["state"], tensors, ctx.device, mesh))
    ctx.example_passes = meta["example_passes"]
    ctx.rng.setstate(_py_state_back(meta["rng"]["ctx"]))
    random.setstate(_py_state_back(meta["rng"]["python"]))
    name, keys, *rest = meta["rng"]["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[f"rng.cuda.{i}"] for i in range(sum(k.startswith("rng.cuda.") for k in tensors))]
    if cuda:
        if torch.cuda.device_count() != len(cuda):
            raise UserError(f"checkpoint {ckpt.path} was written with {len(cuda)} CUDA devices, this machine has "
                            f"{torch.cuda.device_count()}: resume it on the same hardware, or {_FIX}")
        torch.cuda.set_rng_state_all(cuda)
    return {"rows": meta["rows"], "experiences": meta["experiences"]}


# --- helpers ------------------------------------------------------------------------------------------------
_META_TYPES = {"config": dict, "tasks": list, "probes": list, "experience": int, "files": dict, "rows": list,
               "experiences": list, "example_passes": int, "rng": dict, "plugins": list}


def _check_layout(path: Path, meta: dict[str, Any], cfg: RunConfig) -> None:
    """A UserError unless the checkpoint's weights are sharded over as many processes as this run shards them."""
    sharded = meta.get("sharded")
    written = sharded.get("world_size") if isinstance(sharded, dict) else None
    now = dist.world_size() if sharding.sharded(cfg) else None
    if written == now:
        return
    if written is None:
        raise UserError(f"checkpoint {path} holds whole weights and this run shards them (parallel=fsdp): resume it "
                        f"as it was started, without --set parallel=fsdp, or {_FIX}")
    if now is None:
        raise UserError(f"checkpoint {path} holds weights sharded over {written} processes (parallel=fsdp): resume "
                        f"it with torchrun --nproc_per_node {written} and --set parallel=fsdp, or {_FIX}")
    raise UserError(f"checkpoint {path} holds weights sharded over {written} processes and this run has {now}: "
                    f"resume it with torchrun --nproc_per_node {written}, or {_FIX}")


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0]


def _identity(cfg: RunConfig, stream: Stream, fp: dict[str, str] | None = None) -> dict[str, Any]:
    return {"config": cfg.model_dump(), "tasks": [t.name for t in stream.tasks],
            "probes": [p.name for p in stream.probes], "fingerprint": fp or cell_fingerprint(cfg, stream)}


def _py_state(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _py_state_back(state: list) -> tuple:
    version, internal, gauss = state
    return version, tuple(internal), gauss


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """A safetensors file, written atomically (of a DTensor, this process's shard)."""
    write_bytes(path, save({k: dist.local(t).detach().to("cpu").contiguous() for k, t in tensors.items()}))


def _split(value: Any, tensors: dict[str, torch.Tensor], prefix: str, owner: str) -> Any:
    """``value`` as JSON: each tensor moved into ``tensors`` under a new key and replaced by a reference to it."""
    if isinstance(value, torch.Tensor):
        key = f"{prefix}.{len(tensors)}"
        if dist.is_sharded(value):  # FSDP: this rank's shard, and the shape of the whole
            sharding.check_shard(value, f"{owner}.state_dict()")
            tensors[key] = dist.local(value)
            return {_TENSOR: key, _SHARD: list(value.shape)}
        tensors[key] = value
        return {_TENSOR: key}
    if isinstance(value, dict):
        for k in value:
            if not isinstance(k, str) or k in (_TENSOR, _SHARD):
                raise TypeError(f"{owner}.state_dict() has the dict key {k!r}: a checkpoint keeps str keys "
                                f"other than {_TENSOR!r} and {_SHARD!r} only")
        return {k: _split(v, tensors, prefix, owner) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_split(v, tensors, prefix, owner) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"{owner}.state_dict() holds a {type(value).__name__}: a checkpoint keeps tensors, str, int, "
                    "float, bool, None, lists and str-keyed dicts only")


def _join(value: Any, tensors: dict[str, torch.Tensor], device: torch.device, mesh: Any = None) -> Any:
    """The inverse of ``_split``: references replaced by their tensors, on ``device`` (the model's); a shard becomes
    a DTensor again over ``mesh`` (the sharded model's)."""
    if isinstance(value, dict):
        if _TENSOR in value and value.keys() <= {_TENSOR, _SHARD}:
            t = tensors[value[_TENSOR]].to(device)
            if _SHARD not in value:
                return t
            if mesh is None:
                raise ValueError("a plugin state holds a shard and the model is not sharded")
            return sharding.from_shard(t, value[_SHARD], mesh)
        return {k: _join(v, tensors, device, mesh) for k, v in value.items()}
    if isinstance(value, list):
        return [_join(v, tensors, device, mesh) for v in value]
    return value


def _load_model(model: torch.nn.Module, saved: dict[str, torch.Tensor], where: Path) -> None:
    own = model_tensors(model)
    if own.keys() != saved.keys():
        odd = sorted(own.keys() ^ saved.keys())
        raise UserError(f"checkpoint {where} does not fit the model: {len(odd)} tensor names differ "
                        f"(e.g. {odd[0]!r}); {_FIX}")
    with torch.no_grad():  # a DTensor's shard: this rank's part (local)
        own = {n: dist.local(t) for n, t in own.items()}
    for n, t in own.items():
        if t.shape != saved[n].shape or t.dtype != saved[n].dtype:
            raise UserError(f"checkpoint {where} does not fit the model: {n} is {saved[n].dtype} "
                            f"{tuple(saved[n].shape)} there, {t.dtype} {tuple(t.shape)} here; {_FIX}")
    with torch.no_grad():
        for n, t in own.items():
            t.copy_(saved[n])
