"""Task streams: ordered tasks plus never-trained probes, declared in YAML and loaded through ``datasets``."""
from __future__ import annotations

import string
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import yaml
from datasets import Dataset, DatasetDict, load_dataset

from .errors import UserError
from .registry import Registry

DATA_BUILDERS: Registry[Callable[..., Any]] = Registry("data builder")


def data_builder(name: str) -> Callable:
    """Decorator: register ``fn(seed, **kwargs) -> {"train": Dataset, "eval": Dataset}`` for ``source: {builder: name}``."""
    return DATA_BUILDERS.decorator(name)


@dataclass
class Task:
    """One experience (or probe): train/eval splits of rows with ``prompt``, ``target`` (and ``choices``, ``answer``)."""
    name: str
    train: Dataset | None
    eval: Dataset
    scorer: str
    category: str = ""
    chat: bool = False  # format prompts with the tokenizer's chat template


@dataclass
class Stream:
    name: str
    tasks: list[Task]
    probes: list[Task]
    model: str
    chat: bool = False
    train: dict[str, Any] = field(default_factory=dict)
    eval: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    source_file: str = ""
    general: Dataset | None = None  # general-purpose training data, for rehearsal (never a probe)


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    if path in seen:
        raise UserError(f"stream file {path} includes itself (via {' -> '.join(map(str, seen))}); remove the cycle")
    try:
        doc = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UserError(f"stream file {path} not found: give an existing .yaml file or a name from "
                        "'clsuite list streams'") from None
    except yaml.YAMLError as e:
        raise UserError(f"stream file {path} is not valid YAML: {str(e).splitlines()[0]}; fix the syntax") from None
    if not isinstance(doc, dict):
        raise UserError(f"stream file {path} must hold a mapping (name:, tasks:, ...), got {type(doc).__name__}")
    includes = doc.pop("include", [])
    merged: dict = {}
    for inc in [includes] if isinstance(includes, str) else includes:
        merged = _deep_merge(merged, _read_yaml((path.parent / inc).resolve(), (*seen, path)))
    return _deep_merge(merged, doc)


def builtin_stream_files() -> dict[str, Path]:
    """Stream name -> YAML file shipped in ``clsuite.benchmarks`` (files starting with ``_`` are fragments)."""
    root = resources.files("clsuite.benchmarks")
    out = {}
    for f in sorted(root.iterdir(), key=lambda f: f.name):
        if f.name.endswith(".yaml") and not f.name.startswith("_"):
            out[Path(f.name).stem] = Path(str(f))
    return out


def resolve_stream_file(name_or_path: str) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        return p.resolve()
    files = builtin_stream_files()
    if name_or_path not in files:
        import difflib
        close = difflib.get_close_matches(name_or_path, list(files), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise UserError(f"unknown stream {name_or_path!r}: {hint}known: {', '.join(files)}; or give a .yaml path")
    return files[name_or_path]


def _check_template(tmpl: str, where: str) -> str:
    for _, fld, spec, conv in string.Formatter().parse(tmpl):
        if fld is not None and not fld.isidentifier():
            raise UserError(f"{where}: template field {{{fld}}} must be a plain column name")
    return tmpl


def _format_rows(ds: Dataset, spec: dict, where: str) -> Dataset:
    """Apply ``prompt:``/``target:`` templates and ``choices:``/``answer:`` column names to raw rows."""
    if "prompt" not in spec and "prompt" in ds.column_names:
        return ds
    if "prompt" not in spec or ("target" not in spec and "choices" not in spec):
        raise UserError(f"{where}: rows lack prompt/target columns; add 'prompt:' and 'target:' templates "
                        "(e.g. prompt: '{question}', target: '{answer}')")
    pt = _check_template(spec["prompt"], where)
    tt = _check_template(spec["target"], where) if "target" in spec else None
    ch, ans = spec.get("choices"), spec.get("answer")

    def fmt(row: dict) -> dict:
        try:
            out = {"prompt": pt.format(**row)}
            if ch:
                out["choices"] = [str(c) for c in row[ch]]
                out["answer"] = int(row[ans])
                out["target"] = out["choices"][out["answer"]]
            else:
                out["target"] = tt.format(**row)
        except KeyError as e:
            raise UserError(f"{where}: column {e} not in the data (columns: {', '.join(row)})") from None
        return out

    return ds.map(fmt, remove_columns=ds.column_names)


def _load_source(src: dict, seed: int, where: str) -> dict[str, Dataset]:
    src = dict(src)
    if "builder" in src:
        fn = DATA_BUILDERS.get(src.pop("builder"))
        out = fn(seed=seed, **src)
        return out if isinstance(out, dict) else {"train": out}
    try:
        ds = load_dataset(**src)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(f"{where}: cannot load data {src}: {e}") from None
    return dict(ds) if isinstance(ds, DatasetDict) else {"train": ds}


def _build_task(spec: dict, seed: int, probe: bool, where: str, chat: bool = False) -> Task:
    for key in ("name", "source", "scorer"):
        if key not in spec:
            raise UserError(f"{where}: missing '{key}:' (a task needs name, source and scorer)")
    from .scoring import SCORERS
    SCORERS.get(spec["scorer"])
    splits = _load_source(spec["source"], seed, where)
    train_split, eval_split = spec.get("train_split", "train"), spec.get("eval_split", "eval")
    if eval_split not in splits:
        if train_split not in splits:
            raise UserError(f"{where}: no split {eval_split!r} or {train_split!r} in {list(splits)}; "
                            "name them with train_split:/eval_split:")
        size = spec.get("eval_size", 0.2)
        parts = splits[train_split].train_test_split(test_size=size, seed=seed)
        splits = {train_split: parts["train"], eval_split: parts["test"]}
    ev = _format_rows(splits[eval_split], spec, where)
    if spec.get("max_eval"):
        ev = ev.select(range(min(len(ev), int(spec["max_eval"]))))
    tr = None if probe else _format_rows(splits[train_split], spec, where)
    return Task(spec["name"], tr, ev, spec["scorer"], spec.get("category", ""),
                bool(spec.get("chat_template", chat)))


def load_stream(name_or_path: str) -> Stream:
    """Load a stream by built-in name or YAML path; data splits are fixed by the stream's ``data_seed``."""
    from . import benchmarks  # noqa: F401  (registers built-in data builders and models)
    path = resolve_stream_file(name_or_path)
    doc = _read_yaml(path)
    name = doc.get("name") or path.stem
    seed = int(doc.get("data_seed", 0))
    chat = bool(doc.get("chat_template", False))
    tasks = [_build_task(t, seed, False, f"stream {name}, task {i + 1}", chat)
             for i, t in enumerate(doc.get("tasks") or [])]
    if not tasks:
        raise UserError(f"stream {name} ({path}) has no tasks: add a 'tasks:' list")
    probes = [_build_task(t, seed, True, f"stream {name}, probe {i + 1}", chat)
              for i, t in enumerate(doc.get("probes") or [])]
    names = [t.name for t in tasks + probes]
    if len(set(names)) != len(names):
        raise UserError(f"stream {name}: task and probe names must be unique, got {names}")
    if "model" not in doc:
        raise UserError(f"stream {name} ({path}) has no 'model:'; name a model id, path or registered model")
    general = None
    if doc.get("general_data"):
        g = doc["general_data"]
        general = _build_task({"name": "general", "scorer": "loglik", **g}, seed, False,
                              f"stream {name}, general_data", chat).train
    return Stream(name, tasks, probes, str(doc["model"]), chat,
                  doc.get("train") or {}, doc.get("eval") or {}, doc.get("description", ""), str(path), general)
