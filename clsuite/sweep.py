"""Sweeps: expand a grid YAML (streams x strategies x hyper-parameters x seeds) into cells and run them.

Each cell is one ``run_one`` call writing one record atomically; a cell already recorded with the same
configuration is skipped, so a restarted sweep resumes. Backends: ``local`` (in-process, or a spawn process
pool) and ``ray`` (one task per cell on a local or existing cluster).
"""
from __future__ import annotations

import difflib
import functools
import itertools
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, cast

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from .config import EvalConfig, RunConfig, TrainConfig, _loc
from .errors import DivergenceError, UserError

EXAMPLE = "see examples/sweep-tiny.yaml"
RAY_INSTALL = "pip install 'clsuite[ray]'"


class Grid(BaseModel):
    """A sweep grid: every stream x strategy x combination of ``set`` values x seed is one run."""
    model_config = ConfigDict(extra="forbid")
    streams: list[StrictStr] = Field(min_length=1)
    strategies: list[StrictStr] = Field(min_length=1)
    seeds: list[StrictInt] = Field(min_length=1)
    model: StrictStr | None = None
    set_: dict[str, Annotated[list[Any], Field(min_length=1)]] = Field({}, alias="set")
    eval: dict[str, Any] = {}


@dataclass(frozen=True)
class Cell:
    """One run of a sweep: what ``run_one`` needs, in picklable form."""
    stream: str  # a built-in stream name or an absolute .yaml path, as load_stream takes it
    config: RunConfig
    tag: str  # the swept hyper-parameters, e.g. "lr=0.0002,steps=20"; "" when the grid has no ``set:``
    out: str  # absolute: workers may run in another directory or on another node

    @property
    def label(self) -> str:
        tag = f" [{self.tag}]" if self.tag else ""
        return f"{self.config.stream} | {self.config.strategy}{tag} | seed {self.config.seed}"

    @property
    def path(self) -> Path:
        from .runner import record_path
        return record_path(Path(self.out), self.config, self.tag)


@dataclass(frozen=True)
class Outcome:
    """What happened to one cell: ran, skipped (already recorded) or failed (with the error)."""
    label: str
    status: Literal["ran", "skipped", "failed"]
    path: str
    error: str = ""


def _problem(err: dict) -> str:
    """One pydantic error of the grid, phrased with its fix."""
    loc, where = err["loc"], _loc(err["loc"])
    if err["type"] == "extra_forbidden" and len(loc) == 1:
        return f"unknown key {where!r}: the keys are streams, strategies, seeds, model, set, eval"
    if err["type"] == "missing":
        return f"{where!r} is missing: add it as a list, e.g. {where}: [...]"
    if loc[:1] == ("set",) and len(loc) == 2 and err["type"] == "list_type":
        return f"{where}: give a list of values to sweep, e.g. {loc[1]}: [{err['input']!r:.40}]"
    return f"{where}: {err['msg']}"


def _check_keys(keys: list[str], cls: type[BaseModel], where: str) -> None:
    """Refuse a setting ``cls`` does not have, suggesting the closest one."""
    known = list(cls.model_fields)
    for k in keys:
        if k not in known:
            close = difflib.get_close_matches(k, known, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise UserError(f"{where}: unknown setting {k!r}: {hint}known: {', '.join(known)}")


def load_grid(path: Path) -> Grid:
    """Read and validate a grid YAML (``yaml.safe_load``, unknown keys refused) or raise a one-line UserError."""
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"grid {path} not found: give a sweep grid .yaml ({EXAMPLE})") from None
    except yaml.YAMLError as e:
        raise UserError(f"grid {path} is not valid YAML: {(str(e).splitlines() or [''])[0]}; fix the syntax") from None
    except (OSError, UnicodeDecodeError, RecursionError) as e:
        raise UserError(f"grid {path} cannot be read ({type(e).__name__}); give a UTF-8 YAML file") from None
    if not isinstance(doc, dict):
        raise UserError(f"grid {path} must hold a mapping with streams:, strategies:, seeds: and optional "
                        f"model:, set:, eval: ({EXAMPLE})")
    try:
        grid = Grid.model_validate(doc)
    except pydantic.ValidationError as e:
        raise UserError(f"grid {path}: {'; '.join(_problem(x) for x in e.errors())} ({EXAMPLE})") from None
    _check_keys(list(grid.set_), TrainConfig, f"grid {path}, set:")
    _check_keys(list(grid.eval), EvalConfig, f"grid {path}, eval:")
    return grid


@functools.lru_cache(maxsize=None)
def _stream(ref: str) -> Any:
    """A stream loaded once per process (workers run many cells of the same stream)."""
    from .streams import load_stream
    return load_stream(ref)


def run_tag(train: TrainConfig, keys: list[str]) -> str:
    """The swept settings of a cell as ``k=v,...`` (sorted keys, validated values), e.g. ``lr=0.0002,steps=20``."""
    return ",".join(f"{k}={getattr(train, k)}" for k in sorted(keys))


def expand(grid: Grid, grid_path: Path, out: Path) -> list[Cell]:
    """Every cell of the grid, validated; stream .yaml paths are relative to the grid file."""
    from .runner import resolve_config
    _stream.cache_clear()  # streams are read once per sweep, from the files as they are now
    keys = list(grid.set_)
    combos = [dict(zip(keys, values)) for values in itertools.product(*grid.set_.values())]
    cells: list[Cell] = []
    for ref in grid.streams:
        if Path(ref).suffix in (".yaml", ".yml"):
            ref = str((Path(grid_path).parent / ref).resolve())
        s = _stream(ref)
        for spec in grid.strategies:
            for combo in combos:
                for seed in grid.seeds:
                    cfg = resolve_config(s, spec, seed, grid.model, combo, grid.eval)
                    cells.append(Cell(ref, cfg, run_tag(cfg.train, keys) if keys else "", str(Path(out).resolve())))
    seen: dict[Path, Cell] = {}
    for c in cells:
        if c.path in seen:
            raise UserError(f"grid {grid_path}: cells {seen[c.path].label!r} and {c.label!r} are the same run "
                            f"(record {c.path}): remove the duplicate entry")
        seen[c.path] = c
    return cells


def run_cell(cell: Cell, force: bool = False) -> Outcome:
    """Run one cell (no progress bars), continuing an interrupted one from its checkpoint unless ``force``
    (start over, replacing any record); a DivergenceError or UserError becomes a failed outcome."""
    from .runner import run_one
    path = cell.path
    before = _stamp(path)
    try:
        run_one(_stream(cell.stream), cell.config, Path(cell.out), progress=False, force=force, tag=cell.tag,
                resume=not force)
    except (DivergenceError, UserError) as e:
        return Outcome(cell.label, "failed", str(path), str(e))
    status = "skipped" if before is not None and _stamp(path) == before else "ran"
    return Outcome(cell.label, status, str(path))


def _stamp(path: Path) -> tuple[int, int] | None:
    """(inode, mtime) of a record: atomic writes replace the file, so an untouched record keeps both."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def _init_worker(threads: int) -> None:
    """Worker process setup: ``threads`` torch threads, no model-loading progress bars."""
    import torch
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    torch.set_num_threads(threads)


def _ray_cell(cell: Cell, force: bool, threads: int) -> Outcome:
    """A cell as a Ray task (module-level so workers import it rather than unpickle it)."""
    _init_worker(threads)
    return run_cell(cell, force)


def import_ray() -> Any:
    """The ``ray`` module, or a UserError with the command that installs it."""
    try:
        import ray
    except ImportError:
        raise UserError(f"--backend ray needs Ray, which is not installed: {RAY_INSTALL}") from None
    return ray


def check_options(backend: str, workers: int | None, address: str | None, cpus_per_run: int | None,
                  gpus_per_run: float | None) -> None:
    """Refuse backend options that contradict each other, before any run starts."""
    if backend not in ("local", "ray"):
        raise UserError(f"--backend {backend!r}: choose local or ray")
    if workers is not None and workers < 1:
        raise UserError(f"--workers {workers}: give at least 1")
    if backend == "local":
        for name, value in (("--address", address), ("--cpus-per-run", cpus_per_run),
                            ("--gpus-per-run", gpus_per_run)):
            if value is not None:
                raise UserError(f"{name} is for --backend ray; add --backend ray or drop {name}")
        return
    if address is not None and workers is not None:
        raise UserError("--workers sizes the local Ray cluster; with --address the cluster's resources set how many "
                        "runs go at once: drop --workers")
    if cpus_per_run is not None and cpus_per_run < 1:
        raise UserError(f"--cpus-per-run {cpus_per_run}: give at least 1")
    if gpus_per_run is not None and gpus_per_run < 0:
        raise UserError(f"--gpus-per-run {gpus_per_run}: give 0 or more (fractions share a GPU)")
    import_ray()


def run_cells(cells: list[Cell], backend: str = "local", workers: int | None = None, address: str | None = None,
              cpus_per_run: int | None = None, gpus_per_run: float | None = None, force: bool = False,
              progress: bool = True) -> list[Outcome]:
    """Run every cell on the backend with a progress bar over cells; outcomes in the cells' order."""
    from tqdm.auto import tqdm
    check_options(backend, workers, address, cpus_per_run, gpus_per_run)
    if not cells:
        return []
    outcomes: list[Outcome | None] = [None] * len(cells)
    counts = {"ran": 0, "skipped": 0, "failed": 0}
    with tqdm(total=len(cells), desc="sweep", unit="run", disable=not progress) as bar:
        def done(i: int, o: Outcome) -> None:
            outcomes[i] = o
            counts[o.status] += 1
            bar.set_postfix(counts, refresh=False)
            bar.update(1)
        if backend == "local" and (workers or 1) == 1:
            _run_in_process(cells, force, done)
        elif backend == "local":
            _run_pool(cells, force, workers, done)
        else:
            _run_ray(cells, force, workers, address, cpus_per_run or 1, gpus_per_run or 0.0, done)
    return cast(list[Outcome], outcomes)  # each backend reports every cell once, or raises


def _run_in_process(cells: list[Cell], force: bool, done: Callable[[int, Outcome], None]) -> None:
    """One cell after another in this process, its torch threads kept, model-loading bars off meanwhile."""
    from transformers.utils import logging as hf_logging
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        for i, c in enumerate(cells):
            done(i, run_cell(c, force))
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _run_pool(cells: list[Cell], force: bool, workers: int, done: Callable[[int, Outcome], None]) -> None:
    """A spawn process pool of ``workers``, each with cpu_count // workers torch threads (at least 1)."""
    workers = min(workers, len(cells))
    threads = max(1, (os.cpu_count() or 1) // workers)
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_init_worker, initargs=(threads,))
    try:
        futures = {pool.submit(run_cell, c, force): i for i, c in enumerate(cells)}
        for f in as_completed(futures):
            done(futures[f], f.result())
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()


def _run_ray(cells: list[Cell], force: bool, workers: int | None, address: str | None, cpus: int, gpus: float,
             done: Callable[[int, Outcome], None]) -> None:
    """One Ray task per cell on the cluster at ``address``, or on a local one sized for ``workers`` runs."""
    ray = import_ray()
    try:
        if address is not None:
            ray.init(address=address)
        else:
            ray.init(num_cpus=workers * cpus if workers else None)
    except ConnectionError as e:
        raise UserError(f"cannot reach a Ray cluster at {address!r} ({(str(e).splitlines() or [''])[0]}); start "
                        "one with 'ray start --head' or drop --address to start a local one") from None
    try:
        task = ray.remote(num_cpus=cpus, num_gpus=gpus)(_ray_cell)
        refs = {task.remote(c, force, cpus): i for i, c in enumerate(cells)}
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for r in ready:
                done(refs[r], ray.get(r))
    finally:
        ray.shutdown()
