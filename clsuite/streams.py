"""Task streams: ordered tasks plus never-trained probes, declared in YAML and loaded through ``datasets``."""
from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import pydantic
import yaml
from datasets import Dataset, DatasetDict, load_dataset

from .errors import UserError, did_you_mean, pydantic_message
from .registry import Registry
from .stream_schema import DataSpec, LmEvalProbeSpec, SourceSpec, StreamSpec, TaskSpec

DATA_BUILDERS: Registry[Callable[..., Any]] = Registry("data builder", "clsuite.builders", builtins="clsuite.benchmarks")


def data_builder(name: str) -> Callable:
    """Decorator: register ``fn(seed, **kwargs) -> {"train": Dataset, "eval": Dataset}`` for ``source: {builder: name}``."""
    return DATA_BUILDERS.decorator(name)


@dataclass
class Task:
    """One experience (or probe): train, test (``eval``) and validation rows with ``prompt``, ``target`` (and
    ``choices``, ``answer``)."""
    name: str
    train: Dataset | None
    eval: Dataset  # the test part: what leaderboards report
    scorer: str
    category: str = ""
    chat: bool = False  # format prompts with the tokenizer's chat template
    lm_eval: Any = None  # a probe scored by lm-evaluation-harness (clsuite.lm_eval_probe.LmEvalProbe); eval is empty
    bos: bool = True  # scoring: the tokenizer's BOS before plain prompts (clsuite.data.prompt_text)
    target_delimiter: str = ""  # scoring: text between the prompt and each target or choice
    val: Dataset | None = None  # the validation part, disjoint from eval, which tuning reads (None: a probe without)

    def conventions(self) -> dict[str, Any]:
        """How its scorer joins prompt and answer: ``{"bos", "target_delimiter"}`` (none for an lm-eval probe)."""
        return {} if self.lm_eval is not None else {"bos": self.bos, "target_delimiter": self.target_delimiter}

    def scoring(self) -> dict[str, Any]:
        """What a record says of its scoring: ``{"scorer", "bos", "target_delimiter"}``."""
        return {"scorer": self.scorer, **self.conventions()}


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
    orders: list[list[str]] | None = None  # task orders by seed (in_order); None: as listed


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


def builtin_stream_files() -> dict[str, Path]:
    """Stream name -> YAML file shipped in ``clsuite.benchmarks/streams`` (files starting with ``_`` are fragments)."""
    root = resources.files("clsuite.benchmarks") / "streams"
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
        raise UserError(f"unknown stream {name_or_path!r}: {did_you_mean(name_or_path, files)}known: "
                        f"{', '.join(files)}; or give a .yaml path")
    return files[name_or_path]


def _validated(cls: type[pydantic.BaseModel], data: Any, where: str, what: str) -> Any:
    """``cls.model_validate(data)``, or a one-line UserError naming ``where`` and each bad key (with a suggestion)."""
    try:
        return cls.model_validate(data)
    except pydantic.ValidationError as e:
        raise UserError(f"{where}: {pydantic_message(e, cls, default=what)}") from None


def _format_rows(ds: Dataset, spec: DataSpec, where: str) -> Dataset:
    """Apply ``prompt:``/``target:`` templates and ``choices:``/``answer:`` column names to raw rows."""
    if spec.prompt is None and "prompt" in ds.column_names:
        return ds
    if spec.prompt is None or (spec.target is None and spec.choices is None):
        raise UserError(f"{where}: rows lack prompt/target columns; add 'prompt:' and 'target:' templates "
                        "(e.g. prompt: '{question}', target: '{answer}')")
    pt, tt, ch, ans = spec.prompt, spec.target, spec.choices, spec.answer

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


def _check_arguments(fn: Callable, name: str, args: dict[str, Any], where: str) -> None:
    """``args`` fit the builder's signature (``seed`` aside): an unknown or a missing argument is a UserError."""
    signature = inspect.signature(fn).parameters
    params = {k: p for k, p in signature.items() if k != "seed" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    takes = f"it takes: {', '.join(params) or 'no arguments'}"
    if not any(p.kind == p.VAR_KEYWORD for p in signature.values()):
        for key in args:
            if key not in params:
                note = "the seed is the stream's data_seed:; " if key == "seed" else did_you_mean(key, params)
                raise UserError(f"{where}: source.{key}: unknown argument of data builder {name!r}; {note}{takes}")
    missing = [k for k, p in params.items() if p.default is p.empty and k not in args]
    if missing:
        raise UserError(f"{where}: source: data builder {name!r} needs {', '.join(f'{k}:' for k in missing)}; {takes}")


def _load_source(src: SourceSpec, seed: int, where: str) -> dict[str, Dataset]:
    args = src.arguments()
    if src.builder is None:
        return load_hf(args, where)
    fn = DATA_BUILDERS.get(src.builder)
    _check_arguments(fn, src.builder, args, where)
    try:
        out = fn(seed=seed, **args)
    except (TypeError, ValueError, KeyError) as e:  # argument values the builder does not accept
        raise UserError(f"{where}: data builder {src.builder!r} rejects the arguments {args!r:.100} "
                        f"({type(e).__name__}: {_first_line(e)})") from None
    return out if isinstance(out, dict) else {"train": out}


def load_hf(args: dict, where: str) -> dict[str, Dataset]:
    """``datasets.load_dataset(**args)`` (hub id or local files) as {split: Dataset}; failures are a UserError."""
    try:
        ds = load_dataset(**args)
    except (FileNotFoundError, ValueError, TypeError, ConnectionError) as e:  # ConnectionError: hub data offline
        raise UserError(f"{where}: cannot load data {args!r:.100}: {_first_line(e)}") from None
    return dict(ds) if isinstance(ds, DatasetDict) else {"train": ds}


def _splits(spec: DataSpec, seed: int, probe: bool, where: str) -> tuple[Dataset | None, Dataset, Dataset | None]:
    """(train rows or None for a probe, eval rows, the source's validation rows or None), formatted; eval is held
    out of train when the source has none."""
    splits = _load_source(spec.source, seed, where)
    val_split = getattr(spec, "val_split", None)  # tasks and probes have one, general data not
    if val_split in (spec.train_split, spec.eval_split):
        raise UserError(f"{where}: val_split: {val_split!r} is also its train_split or eval_split; validation rows "
                        "must be disjoint from both: name another split, or hold rows out with val_size:")
    if val_split in splits and getattr(spec, "val_size", None) is not None:
        raise UserError(f"{where}: the source has a {val_split!r} split and val_size: is given too; drop val_size: "
                        "to use that split, or set val_split: to a split name the source lacks to hold rows out")
    val = _format_rows(splits[val_split], spec, where) if val_split in splits else None
    train_split, eval_split = spec.train_split, spec.eval_split
    if eval_split not in splits:
        if train_split not in splits:
            raise UserError(f"{where}: no split {eval_split!r} or {train_split!r} in {list(splits)}; "
                            "name them with train_split:/eval_split:")
        try:
            parts = splits[train_split].train_test_split(test_size=spec.eval_size, seed=seed)
        except (TypeError, ValueError) as e:
            raise UserError(f"{where}: cannot hold out eval_size: {spec.eval_size!r:.40} ({_first_line(e)}); give "
                            "a fraction in (0, 1) or a number of rows") from None
        splits = {train_split: parts["train"], eval_split: parts["test"]}
    ev = _format_rows(splits[eval_split], spec, where)
    if not probe and train_split not in splits:
        raise UserError(f"{where}: no split {train_split!r} to train on in {list(splits)}; name it with "
                        "train_split:, or list this source under probes:")
    return (None if probe else _format_rows(splits[train_split], spec, where)), ev, val


def _hold_out_val(spec: TaskSpec, train: Dataset | None, ev: Dataset, seed: int, where: str
                  ) -> tuple[Dataset | None, Dataset, Dataset | None]:
    """(train, test, validation): a task's validation rows held out of its training rows (``val_size``, default as
    many as its test rows), a probe's out of its evaluation rows (only when ``val_size`` is given)."""
    source = ev if train is None else train
    size = spec.val_size if spec.val_size is not None or train is None else min(len(ev), len(train) // 2)
    if size is None:
        return train, ev, None
    rows = size if isinstance(size, int) else round(size * len(source))
    if spec.val_size is None and rows < 1:
        raise UserError(f"{where}: {len(source)} training row(s) leave none to hold out as validation rows; give the "
                        "task at least 2 training rows, or a source with a validation split")
    if not 1 <= rows <= len(source) // 2:
        what = "evaluation" if train is None else "training"
        raise UserError(f"{where}: val_size: {size} holds out {rows} of {len(source)} {what} rows; give a size of "
                        f"at least 1 and at most half of them ({len(source) // 2})")
    parts = source.train_test_split(test_size=rows, seed=seed)
    return (parts["train"], ev, parts["test"]) if train is not None else (None, parts["train"], parts["test"])


def _entry_where(where: str, entry: Any) -> str:
    """``where`` with the entry's name when it has one: ``stream s.yaml, task 2 (sorting)``."""
    name = entry.get("name") if isinstance(entry, dict) else None
    if not isinstance(name, str) or not name:
        return where
    return f"{where} ({name:.40})" if name.isprintable() else f"{where} ({name!r:.40})"


def _build_task(entry: Any, seed: int, probe: bool, where: str, chat: bool = False,
                conventions: dict[str, Any] | None = None) -> Task:
    where = _entry_where(where, entry)
    if isinstance(entry, dict) and "lm_eval" in entry:
        if not probe:
            raise UserError(f"{where}: 'lm_eval:' is for probes (scored, never trained on); move the entry under "
                            "probes:")
        return _lm_eval_task(_validated(LmEvalProbeSpec, entry, where, "probe"), entry, where)
    spec: TaskSpec = _validated(TaskSpec, entry, where, "probe" if probe else "task")
    from .scoring import CONVENTIONS, check_conventions
    defaults = conventions or CONVENTIONS  # the stream's bos:/target_delimiter:
    conv = {k: defaults[k] if getattr(spec, k) is None else getattr(spec, k) for k in CONVENTIONS}
    check_conventions(spec.scorer, conv, where)  # also: the scorer exists
    tr, ev, val = _splits(spec, seed, probe, where)
    if val is None:
        tr, ev, val = _hold_out_val(spec, tr, ev, seed, where)
    if spec.max_eval is not None:
        ev, val = (None if d is None else d.select(range(min(len(d), spec.max_eval))) for d in (ev, val))
    return Task(spec.name, tr, ev, spec.scorer, spec.category,
                chat if spec.chat_template is None else spec.chat_template, val=val, **conv)


def _lm_eval_task(spec: LmEvalProbeSpec, entry: dict, where: str) -> Task:
    """A probe scored by lm-evaluation-harness: ``{name, category, lm_eval: {task, num_fewshot, ...}}``."""
    from .lm_eval_probe import load_probe
    empty = Dataset.from_dict({"prompt": [], "target": []})
    return Task(spec.name, None, empty, "lm_eval", spec.category, lm_eval=load_probe(entry, where))


def load_stream(name_or_path: str) -> Stream:
    """Load a stream by built-in name or YAML path; data splits are fixed by the stream's ``data_seed``."""
    path = resolve_stream_file(name_or_path)
    doc = _read_yaml(path)
    where = f"stream {path.name}"
    spec: StreamSpec = _validated(StreamSpec, doc, where, "stream file")
    name, seed, chat = spec.name or path.stem, spec.data_seed, spec.chat_template
    conv = {"bos": spec.bos, "target_delimiter": spec.target_delimiter}
    tasks = [_build_task(t, seed, False, f"{where}, task {i + 1}", chat, conv) for i, t in enumerate(spec.tasks or [])]
    if not tasks:
        raise UserError(f"stream {name} ({path}) has no tasks: add a 'tasks:' list")
    probes = [_build_task(t, seed, True, f"{where}, probe {i + 1}", chat, conv)
              for i, t in enumerate(spec.probes or [])]
    names = [t.name for t in tasks + probes]
    if len(set(names)) != len(names):
        raise UserError(f"{where}: task and probe names must be unique, got {names}")
    general = None
    if spec.general_data is not None:
        general, _, _ = _splits(spec.general_data, seed, False, f"{where}, general_data")
    names = sorted(t.name for t in tasks)
    for order in spec.orders or []:
        if sorted(order) != names:
            raise UserError(f"{where}: orders entry {order} must name each task once ({', '.join(names)}); fix it")
    return Stream(name, tasks, probes, spec.model, chat, doc.get("train") or {}, doc.get("eval") or {},
                  spec.description, str(path), general, spec.orders)


def in_order(stream: Stream, seed: int) -> Stream:
    """The stream with its tasks in the order a run with ``seed`` trains them (``orders[seed mod len]``)."""
    if not stream.orders:
        return stream
    by_name = {t.name: t for t in stream.tasks}
    order = stream.orders[seed % len(stream.orders)]
    return dataclasses.replace(stream, tasks=[by_name[n] for n in order])


SPLITS = ("test", "val")


def for_split(stream: Stream, split: str) -> Stream:
    """The stream as evaluated on ``split``: ``test`` as it is; ``val`` with each task's and probe's validation rows
    in place of its test rows, probes without validation rows left out (selection never reads them)."""
    if split == "test":
        return stream
    if split != "val":
        raise UserError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    tasks = [dataclasses.replace(t, eval=t.val) for t in stream.tasks]
    probes = [dataclasses.replace(p, eval=p.val) for p in stream.probes if p.val is not None]
    return dataclasses.replace(stream, tasks=tasks, probes=probes)
