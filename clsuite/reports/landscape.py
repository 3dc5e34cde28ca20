"""``clsuite landscape``: 2-D (and 1-D) loss surfaces of a saved model, and side-by-side comparisons of them.
Run records carry no weights: it reads a ``save_pretrained`` directory or loads a model by name."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from .. import flatness as fl
from ..atomic import write_json
from ..config import TrainConfig, validated
from ..data import collate, lm_loss
from ..errors import UserError, did_you_mean
from ..models import load_model
from ..provenance import provenance
from ..records import slug
from ..sharpness import ASCENT_STEPS, RHO, TRACE_SAMPLES, first_rows, sharpness_scalars
from ..streams import load_stream
from .plots import plot_surface, plot_surfaces_side_by_side


def find_task(stream: Any, name: str) -> Any:
    """The task or probe called ``name``; a UserError naming the stream's tasks and probes otherwise."""
    for t in stream.tasks + stream.probes:
        if t.name == name:
            return t
    hint = did_you_mean(name, [t.name for t in stream.tasks + stream.probes])
    probes = ", ".join(p.name for p in stream.probes) or "none"
    raise UserError(f"unknown task {name!r} in stream {stream.name}: {hint}tasks: "
                    f"{', '.join(t.name for t in stream.tasks)}; probes: {probes}")


def _check_checkpoint(path: Path) -> None:
    """A one-line UserError unless ``path`` is a save_pretrained directory with a tokenizer."""
    if path.is_file() and path.suffix == ".json":
        raise UserError(f"{path} is a file, not a model: run records carry no weights; give the save_pretrained "
                        "directory of a model with --checkpoint, or a model name with --model")
    if not path.exists():
        raise UserError(f"checkpoint {path} not found: give a directory written by save_pretrained "
                        "(config.json, weights and tokenizer)")
    if not path.is_dir():
        raise UserError(f"checkpoint {path} is not a directory: give a directory written by save_pretrained")
    if not (path / "config.json").exists():
        if (path / "adapter_config.json").exists():
            raise UserError(f"checkpoint {path} holds a PEFT adapter only: merge it (merge_and_unload) and "
                            "save_pretrained the merged model")
        raise UserError(f"checkpoint {path} has no config.json: give a directory written by save_pretrained")
    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise UserError(f"checkpoint {path} has no tokenizer: save it beside the weights "
                        "(tokenizer.save_pretrained(DIR))")


def _surface_json(surface: dict[str, Any]) -> dict[str, Any]:
    """A surface dict from flatness with numpy arrays as lists."""
    return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in surface.items()}


def _model_label(source: str, is_checkpoint: bool) -> str:
    """A short name for plots: ``sam/seed0.model`` for a run's saved model, the name itself otherwise."""
    path = Path(source).resolve()
    return f"{path.parent.name}/{path.name}" if is_checkpoint else source


def fixed_batch_loss(stream: Any, task: Any, source: str, data: Any, n: int
                     ) -> tuple[torch.nn.Module, Callable[[], torch.Tensor], list[torch.Tensor], list[dict]]:
    """Model ``source`` loaded, and the loss on the first ``n`` rows of ``data`` (a split of ``task``) as the
    engine computes it: (model, loss_fn, trainable parameters, rows)."""
    net, tok = load_model(source)
    train = validated(TrainConfig, stream.train, f"training settings of stream {stream.name}")
    rows = first_rows(data, n)
    batch = collate(tok, rows, task.chat, train.max_length, **task.conventions())
    return net, (lambda: lm_loss(net, batch)), [p for p in net.parameters() if p.requires_grad], rows


def landscape(stream: str, task: str, checkpoint: Path | None = None, model: str | None = None,
              split: str = "eval", n: int = 32, grid: int = 11, span: float = 1.0, out: Path | None = None,
              seed: int = 0, line_steps: int = 0, progress: bool = False) -> dict[str, Any]:
    """2-D (and optional 1-D) loss surface plus cheap sharpness scalars of one model on the first ``n`` rows of a
    task's split; writes ``<task>-<split>{.json,_contour.png,_3d.png[,_1d.png]}`` under ``out``."""
    if split not in ("eval", "train"):
        raise UserError(f"--split {split!r}: choose eval or train")
    if n < 1:
        raise UserError(f"--n {n}: give at least 1 example")
    if grid < 3:
        raise UserError(f"--grid {grid}: give at least 3 points per axis")
    if not (span > 0 and math.isfinite(span)):
        raise UserError(f"--span {span}: give a positive number")
    if line_steps and line_steps < 3:
        raise UserError(f"--line-steps {line_steps}: give 0 (no 1-D surface) or at least 3")
    if checkpoint is not None and model is not None:
        raise UserError("give either --checkpoint or --model, not both")
    if checkpoint is not None:
        checkpoint = Path(checkpoint)
        _check_checkpoint(checkpoint)
    s = load_stream(stream)
    t = find_task(s, task)
    data = t.eval if split == "eval" else t.train
    if data is None:
        raise UserError(f"{t.name!r} is a probe and has no train split: use --split eval")
    source = str(checkpoint) if checkpoint is not None else (model or s.model)
    label = _model_label(source, checkpoint is not None)
    out = Path(out) if out is not None else Path("landscapes") / slug(s.name) / slug(source)

    t0 = time.perf_counter()
    net, loss_fn, params, rows = fixed_batch_loss(s, t, source, data, n)
    kw: dict[str, Any] = dict(seed=seed, disable_progress=not progress)
    surface = fl.loss_surface_2d(net, loss_fn, params, span=span, steps=grid, filter_normalize=True, **kw)
    if not np.isfinite(surface["loss"]).all():
        raise UserError(f"the loss is not finite somewhere on the surface at --span {span}: lower --span")
    line = (fl.loss_surface_1d(net, loss_fn, params, span=span, steps=line_steps, filter_normalize=True, **kw)
            if line_steps else None)
    if line is not None and not np.isfinite(line["loss"]).all():
        raise UserError(f"the loss is not finite somewhere on the 1-D surface at --span {span}: lower --span")
    scalars = sharpness_scalars(net, loss_fn, params, "cheap", seed)

    prefix = out / f"{slug(t.name)}-{split}"
    title = f"{label} · {s.name}/{t.name} ({split}, n={len(rows)})"
    pngs = plot_surface(surface, prefix, title) + (plot_surface(line, prefix, title) if line is not None else [])
    doc = {
        "kind": "clsuite-landscape", "version": 1, "model": source,
        "model_source": "checkpoint" if checkpoint is not None else "model",
        "stream": s.name, "task": t.name, "is_probe": any(p is t for p in s.probes), "split": split,
        "n_examples": len(rows), "seed": seed, "grid": grid, "span": span, "filter_normalize": True,
        "parameters": sum(p.numel() for p in params),
        "surface": _surface_json(surface), "line": _surface_json(line) if line is not None else None,
        "surface_sharpness": fl.surface_sharpness(surface), "sharpness": scalars,
        "sharpness_settings": {"rho": RHO, "ascent_steps": ASCENT_STEPS, "trace_samples": TRACE_SAMPLES},
        "seconds": time.perf_counter() - t0, "files": [p.name for p in pngs], "provenance": provenance(),
    }
    json_path = prefix.with_name(prefix.name + ".json")
    write_json(json_path, doc)  # written last: its presence means the PNGs are complete
    return {**doc, "json": str(json_path), "pngs": [str(p) for p in pngs]}


def compare_landscapes(paths: Sequence[Path | str], out: Path | str) -> Path:
    """One PNG with the contour of each landscape JSON side by side on one colour scale (e.g. naive vs SAM);
    the surfaces must share task, split, examples, grid and span."""
    if len(paths) < 2:
        raise UserError("give at least two landscape .json files (written by clsuite landscape) to compare")
    docs = {}
    for path in map(Path, paths):
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"{path}: not a readable landscape JSON ({e}); give the .json clsuite landscape wrote")
        if not isinstance(doc, dict) or doc.get("kind") != "clsuite-landscape":
            raise UserError(f"{path} is not a clsuite landscape JSON (no kind: clsuite-landscape)")
        docs[path] = doc
    keys = ("stream", "task", "split", "n_examples", "grid", "span", "seed")
    first = next(iter(docs.values()))
    for path, doc in docs.items():
        differ = [k for k in keys if doc.get(k) != first.get(k)]
        if differ:
            raise UserError(f"{path} differs from {next(iter(docs))} in {', '.join(differ)}: compare surfaces "
                            "made with the same clsuite landscape settings")
    names = [_model_label(d["model"], d["model_source"] == "checkpoint") for d in docs.values()]
    if len(set(names)) < len(names):
        names = [str(p) for p in docs]
    title = f"{first['stream']}/{first['task']} ({first['split']}, n={first['n_examples']}, span ±{first['span']})"
    return plot_surfaces_side_by_side(dict(zip(names, (d["surface"] for d in docs.values()))), Path(out), title)
