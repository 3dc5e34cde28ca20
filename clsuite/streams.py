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
    lm_eval: Any = None  # a probe scored by lm-evaluation-harness (clsuite.lm_eval_probe.LmEvalProbe); eval is empty


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
    except (OSError, UnicodeDecodeError, RecursionError) as e:  # a directory, not UTF-8, nested too deeply
        raise UserError(f"stream file {path} cannot be read ({type(e).__name__}: {_first_line(e)}); "
                        "give a UTF-8 YAML file") from None
    if not isinstance(doc, dict):
        raise UserError(f"stream file {path} must hold a mapping (name:, tasks:, ...), got {type(doc).__name__}")
    includes = doc.pop("include", None)
    includes = [] if includes is None else [includes] if isinstance(includes, str) else includes
    if not isinstance(includes, list) or not all(isinstance(i, str) and i and "\0" not in i for i in includes):
        raise UserError(f"stream file {path}: 'include:' must be a file name or a list of them, got {includes!r:.80}")
    merged: dict = {}
    for inc in includes:
        merged = _deep_merge(merged, _read_yaml((path.parent / inc).resolve(), (*seen, path)))
    return _deep_merge(merged, doc)


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [""])[0]


def _need(ok: bool, where: str, what: str, got: Any) -> None:
    """Raise a UserError saying what ``where`` must be when a value from the YAML has the wrong type."""
    if not ok:
        raise UserError(f"{where}: {what}, got {type(got).__name__} {got!r:.60}")


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
    _need(isinstance(tmpl, str), where, "prompt:/target: templates are strings such as '{question}'", tmpl)
    try:
        fields = list(string.Formatter().parse(tmpl))
    except ValueError as e:  # a lone brace
        raise UserError(f"{where}: template {tmpl!r:.80} is malformed ({e}); write {{{{ for a literal brace") from None
    for _, fld, spec, conv in fields:
        if fld is not None and (not fld.isidentifier() or spec or conv):
            raise UserError(f"{where}: template {tmpl!r:.80}: field {fld!r} must be a plain column name "
                            "(no attribute, index, conversion or format spec)")
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
        except (TypeError, ValueError, IndexError) as e:
            raise UserError(f"{where}: choices: {ch!r} / answer: {ans!r} do not fit the data "
                            f"({type(e).__name__}: {_first_line(e)}); choices names a list column, "
                            "answer an integer column indexing it") from None
        return out

    return ds.map(fmt, remove_columns=ds.column_names)


def _load_source(src: dict, seed: int, where: str) -> dict[str, Dataset]:
    _need(isinstance(src, dict), where, "'source:' must be a mapping ({builder: NAME, ...} or load_dataset "
          "arguments)", src)
    src = dict(src)
    if "builder" in src:
        name = src.pop("builder")
        _need(isinstance(name, str), where, "'builder:' must name a data builder", name)
        fn = DATA_BUILDERS.get(name)
        try:
            out = fn(seed=seed, **src)
        except (TypeError, ValueError, KeyError) as e:  # arguments the builder does not take or accept
            raise UserError(f"{where}: data builder {name!r} rejects the arguments {src!r:.100} "
                            f"({type(e).__name__}: {_first_line(e)})") from None
        return out if isinstance(out, dict) else {"train": out}
    return load_hf(src, where)


def load_hf(args: dict, where: str) -> dict[str, Dataset]:
    """``datasets.load_dataset(**args)`` (hub id or local files) as {split: Dataset}; failures are a UserError."""
    try:
        ds = load_dataset(**args)
    except (FileNotFoundError, ValueError, TypeError, ConnectionError) as e:  # ConnectionError: hub data offline
        raise UserError(f"{where}: cannot load data {args!r:.100}: {_first_line(e)}") from None
    return dict(ds) if isinstance(ds, DatasetDict) else {"train": ds}


def _build_task(spec: dict, seed: int, probe: bool, where: str, chat: bool = False) -> Task:
    _need(isinstance(spec, dict), where, "a task is a mapping with name, source and scorer", spec)
    if "lm_eval" in spec:
        return _lm_eval_task(spec, probe, where)
    for key in ("name", "source", "scorer"):
        if key not in spec:
            raise UserError(f"{where}: missing '{key}:' (a task needs name, source and scorer)")
    for key in ("name", "scorer", "category", "train_split", "eval_split"):
        _need(isinstance(spec.get(key, ""), str), where, f"'{key}:' must be a string", spec.get(key))
    from .scoring import SCORERS
    SCORERS.get(spec["scorer"])
    splits = _load_source(spec["source"], seed, where)
    train_split, eval_split = spec.get("train_split", "train"), spec.get("eval_split", "eval")
    if eval_split not in splits:
        if train_split not in splits:
            raise UserError(f"{where}: no split {eval_split!r} or {train_split!r} in {list(splits)}; "
                            "name them with train_split:/eval_split:")
        size = spec.get("eval_size", 0.2)
        try:
            parts = splits[train_split].train_test_split(test_size=size, seed=seed)
        except (TypeError, ValueError) as e:
            raise UserError(f"{where}: cannot hold out eval_size: {size!r:.40} ({_first_line(e)}); give a "
                            "fraction in (0, 1) or a number of rows") from None
        splits = {train_split: parts["train"], eval_split: parts["test"]}
    ev = _format_rows(splits[eval_split], spec, where)
    if spec.get("max_eval"):
        _need(isinstance(spec["max_eval"], int), where, "'max_eval:' must be an integer", spec["max_eval"])
        ev = ev.select(range(min(len(ev), int(spec["max_eval"]))))
    if not probe and train_split not in splits:
        raise UserError(f"{where}: no split {train_split!r} to train on in {list(splits)}; name it with "
                        "train_split:, or list this source under probes:")
    tr = None if probe else _format_rows(splits[train_split], spec, where)
    return Task(spec["name"], tr, ev, spec["scorer"], spec.get("category", ""),
                bool(spec.get("chat_template", chat)))


def _lm_eval_task(spec: dict, probe: bool, where: str) -> Task:
    """A probe scored by lm-evaluation-harness: ``{name, category, lm_eval: {task, num_fewshot, ...}}``."""
    if not probe:
        raise UserError(f"{where}: 'lm_eval:' is for probes (scored, never trained on); move the entry under probes:")
    for key in ("name", "category"):
        _need(isinstance(spec.get(key, ""), str), where, f"'{key}:' must be a string", spec.get(key))
    if not spec.get("name"):
        raise UserError(f"{where}: missing 'name:' (an lm_eval probe needs name and lm_eval)")
    from .lm_eval_probe import load_probe
    empty = Dataset.from_dict({"prompt": [], "target": []})
    return Task(spec["name"], None, empty, "lm_eval", spec.get("category", ""),
                lm_eval=load_probe(spec, f"{where} ({spec['name']})"))


def load_stream(name_or_path: str) -> Stream:
    """Load a stream by built-in name or YAML path; data splits are fixed by the stream's ``data_seed``."""
    from . import benchmarks  # noqa: F401  (registers built-in data builders and models)
    path = resolve_stream_file(name_or_path)
    doc = _read_yaml(path)
    name = doc.get("name") or path.stem
    _need(isinstance(name, str) and name.splitlines() == [name], f"stream file {path}",
          "'name:' must be a one-line string", name)
    seed = doc.get("data_seed", 0)
    _need(isinstance(seed, int), f"stream {name}", "'data_seed:' must be an integer", seed)
    for key, kind in (("tasks", list), ("probes", list), ("train", dict), ("eval", dict), ("general_data", dict)):
        _need(isinstance(doc.get(key) or kind(), kind), f"stream {name}",
              f"'{key}:' must be a {'list' if kind is list else 'mapping'}", doc.get(key))
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
    _need(isinstance(doc["model"], str) and doc["model"], f"stream {name}",
          "'model:' must name a model id, path or registered model", doc["model"])
    general = None
    if doc.get("general_data"):
        g = doc["general_data"]
        general = _build_task({"name": "general", "scorer": "loglik", **g}, seed, False,
                              f"stream {name}, general_data", chat).train
    return Stream(name, tasks, probes, str(doc["model"]), chat,
                  doc.get("train") or {}, doc.get("eval") or {}, doc.get("description", ""), str(path), general)
