"""Sweeps: expand a grid YAML (streams x strategies x hyper-parameters x seeds) into cells and run them.

Each cell is one ``run_one`` call writing one record atomically; a cell already recorded with the same
fingerprint is skipped, so a restarted sweep resumes, and one recorded with another (stale) runs again.
Backends: ``local`` (in-process, or a spawn process pool) and ``ray`` (one task per cell on a local or existing cluster).
"""
from __future__ import annotations

import functools
import itertools
import multiprocessing
import os
import socket
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait as wait_any
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, cast

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from .atomic import DiskFullError, FileLock, probe_writable, remove_stale_temporaries
from .config import EvalConfig, RunConfig, TrainConfig, resolve_config
from .errors import DivergenceError, UserError, did_you_mean, error_location
from .fingerprint import FingerprintMismatch
from .records import record_path

EXAMPLE = "see examples/sweep-tiny.yaml"
RAY_INSTALL = "pip install 'clsuite[ray]'"


class RunEntry(BaseModel):
    """One strategy with its own fixed training settings (``runs:``), e.g. a setting ``clsuite tune`` selected."""
    model_config = ConfigDict(extra="forbid")
    strategy: StrictStr
    set_: dict[str, Any] = Field({}, alias="set")
    name: StrictStr = ""  # informational: the tuned strategy it stands for
    roles: list[StrictStr] = []  # informational: selected, matched, budget=<k>x
    seeds: list[StrictInt] = []  # more seeds for this entry, after the grid's (e.g. a protocol's primary rows)


class Grid(BaseModel):
    """A sweep grid: every stream x strategy (or ``runs:`` entry) x combination of ``set`` values x seed is one run."""
    model_config = ConfigDict(extra="forbid")
    streams: list[StrictStr] = Field(min_length=1)
    strategies: list[StrictStr] = []
    runs: list[RunEntry] = []
    seeds: list[StrictInt] = Field(min_length=1)
    model: StrictStr | None = None
    set_: dict[str, Annotated[list[Any], Field(min_length=1)]] = Field({}, alias="set")
    eval: dict[str, Any] = {}
    selection: dict[str, Any] = {}  # written by clsuite tune (rule, candidates, validation scores); not read here

    @pydantic.model_validator(mode="after")
    def _something_to_run(self) -> "Grid":
        if not self.strategies and not self.runs:
            raise ValueError("'strategies' is missing: add it as a list, e.g. strategies: [naive], or give runs:")
        return self


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
        return record_path(Path(self.out), self.config, self.tag)


@dataclass(frozen=True)
class Outcome:
    """What happened to one cell: ran, skipped (already recorded), failed (with the error), not run (the sweep
    stopped first) or busy (another process holds its lock; the backends wait for it later)."""
    label: str
    status: Literal["ran", "skipped", "failed", "not run", "busy"]
    path: str
    error: str = ""
    stale: tuple[str, ...] = ()  # the fingerprint parts in which the record (or checkpoint) it replaced differed
    stop: bool = False  # the sweep stops: every other cell would fail the same way (a full disk)


def _problem(err: dict) -> str:
    """One pydantic error of the grid, phrased with its fix."""
    loc, where = err["loc"], error_location(err["loc"])
    if err["type"] == "extra_forbidden" and len(loc) == 1:
        known = [f.alias or k for k, f in Grid.model_fields.items()]
        return f"unknown key {where!r}: {did_you_mean(str(loc[0]), known)}the keys are {', '.join(known)}"
    if err["type"] == "missing":
        return f"{where!r} is missing: add it as a list, e.g. {where}: [...]"
    if loc[:1] == ("set",) and len(loc) == 2 and err["type"] == "list_type":
        return f"{where}: give a list of values to sweep, e.g. {loc[1]}: [{err['input']!r:.40}]"
    return f"{where}: {err['msg']}"


def check_keys(keys: list[str], cls: type[BaseModel], where: str) -> None:
    """Refuse a setting ``cls`` does not have, suggesting the closest one."""
    known = list(cls.model_fields)
    for k in keys:
        if k not in known:
            raise UserError(f"{where}: unknown setting {k!r}: {did_you_mean(k, known)}known: {', '.join(known)}")


def read_grid_doc(path: Path, example: str = EXAMPLE, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A grid file as a mapping, the files it names under ``include:`` merged beneath it (relative paths), or a
    one-line UserError."""
    path = Path(path).resolve()
    if path in seen:
        raise UserError(f"grid {path} includes itself (via {' -> '.join(map(str, seen))}); remove the cycle")
    try:
        doc = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UserError(f"grid {path} not found: give a grid .yaml ({example})") from None
    except yaml.YAMLError as e:
        raise UserError(f"grid {path} is not valid YAML: {(str(e).splitlines() or [''])[0]}; fix the syntax") from None
    except (OSError, UnicodeDecodeError, RecursionError) as e:
        raise UserError(f"grid {path} cannot be read ({type(e).__name__}); give a UTF-8 YAML file") from None
    if not isinstance(doc, dict):
        raise UserError(f"grid {path} must hold a mapping of settings ({example})")
    includes = doc.pop("include", [])
    includes = [includes] if isinstance(includes, str) else includes
    if not isinstance(includes, list) or not all(isinstance(i, str) and i for i in includes):
        raise UserError(f"grid {path}: 'include:' must be a file name or a list of them, got {includes!r:.80}")
    merged: dict[str, Any] = {}
    for inc in includes:
        merged.update(read_grid_doc(path.parent / inc, example, (*seen, path)))
    if isinstance(doc.get("streams"), list):  # .yaml stream paths are relative to the file naming them
        doc["streams"] = [str(path.parent / r) if isinstance(r, str) and r.endswith((".yaml", ".yml")) else r
                          for r in doc["streams"]]
    return {**merged, **doc}


def load_grid(path: Path) -> Grid:
    """Read and validate a grid YAML (``yaml.safe_load``, ``include:`` merged, unknown keys refused) or raise a
    one-line UserError."""
    doc = read_grid_doc(path)
    try:
        grid = Grid.model_validate(doc)
    except pydantic.ValidationError as e:
        raise UserError(f"grid {path}: {'; '.join(_problem(x) for x in e.errors())} ({EXAMPLE})") from None
    check_keys(list(grid.set_), TrainConfig, f"grid {path}, set")
    for i, entry in enumerate(grid.runs):
        check_keys(list(entry.set_), TrainConfig, f"grid {path}, runs[{i}].set")
    check_keys(list(grid.eval), EvalConfig, f"grid {path}, eval")
    return grid


@functools.lru_cache(maxsize=None)
def cached_stream(ref: str) -> Any:
    """A stream loaded once per process (workers run many cells of the same stream)."""
    from .streams import load_stream
    return load_stream(ref)


def run_tag(train: TrainConfig, keys: list[str]) -> str:
    """The swept settings of a cell as ``k=v,...`` (sorted keys, validated values), e.g. ``lr=0.0002,steps=20``."""
    return ",".join(f"{k}={getattr(train, k)}" for k in sorted(keys))


def expand(grid: Grid, grid_path: Path, out: Path) -> list[Cell]:
    """Every cell of the grid, validated; stream .yaml paths are relative to the grid file."""
    cached_stream.cache_clear()  # streams are read once per sweep, from the files as they are now
    keys = list(grid.set_)
    combos = [dict(zip(keys, values)) for values in itertools.product(*grid.set_.values())]
    cells: list[Cell] = []
    for ref in grid.streams:
        if Path(ref).suffix in (".yaml", ".yml"):
            ref = str((Path(grid_path).parent / ref).resolve())
        s = cached_stream(ref)
        entries = [RunEntry(strategy=spec) for spec in grid.strategies] + grid.runs
        for entry in entries:
            for combo in combos:
                tagged = sorted({*keys, *entry.set_})
                for seed in [*grid.seeds, *(k for k in entry.seeds if k not in grid.seeds)]:
                    cfg = resolve_config(s, entry.strategy, seed, grid.model, {**combo, **entry.set_}, grid.eval)
                    cells.append(Cell(ref, cfg, run_tag(cfg.train, tagged) if tagged else "",
                                      str(Path(out).resolve())))
    seen: dict[Path, Cell] = {}
    for c in cells:
        if c.path in seen:
            raise UserError(f"grid {grid_path}: cells {seen[c.path].label!r} and {c.label!r} are the same run "
                            f"(record {c.path}): remove the duplicate entry")
        seen[c.path] = c
    return cells


def run_cell(cell: Cell, force: bool = False, wait: bool = True) -> Outcome:
    """Run one cell holding its lock (``.seed<k>.json.lock``, so two sweeps never run it at once), after deleting
    the temporary files killed writers left; ``busy``, unrun, if another process holds it and not ``wait``."""
    from .evalcache import cache_path
    from .runner import cell_name
    path = cell.path
    lock_path = path.with_name(f".{path.name}.lock")
    try:
        lock = FileLock.acquire(lock_path, wait, note=f"{socket.gethostname()} {os.getpid()}\n")
    except DiskFullError as e:
        e.cell = cell_name(cell.config, cell.tag)
        return Outcome(cell.label, "failed", str(path), str(e), stop=True)
    except OSError as e:
        return Outcome(cell.label, "failed", str(path), f"cannot create the lock file {lock_path} "
                       f"({e.strerror or e}): make {lock_path.parent} writable")
    if lock is None:
        return Outcome(cell.label, "busy", str(path))
    with lock:  # this cell's files are written by the lock holder alone; row 0's cache is shared by cells
        remove_stale_temporaries(path.parent, (f".{path.name}.", f".{path.with_suffix('.model').name}."))
        remove_stale_temporaries(path.with_suffix(".ckpt"))
        remove_stale_temporaries(cache_path(Path(cell.out), cell.config.stream, "").parent)
        return _run_cell(cell, force)


def _run_cell(cell: Cell, force: bool = False) -> Outcome:
    """Run one cell (no progress bars), continuing an interrupted one from its checkpoint unless ``force``
    (start over, replacing any record); a DivergenceError or UserError becomes a failed outcome."""
    from .runner import run_one
    path = cell.path
    before = _stamp(path)
    stale: tuple[str, ...] = ()
    try:
        try:
            run_one(cached_stream(cell.stream), cell.config, Path(cell.out), progress=False, force=force, tag=cell.tag,
                    resume=not force)
        except FingerprintMismatch as e:  # a record of another cell: run this one over it (replaced atomically)
            stale = tuple(e.parts)
            run_one(cached_stream(cell.stream), cell.config, Path(cell.out), progress=False, force=True, tag=cell.tag)
    except DiskFullError as e:  # run_one named the cell
        return Outcome(cell.label, "failed", str(path), str(e), stale, stop=True)
    except (DivergenceError, UserError) as e:
        return Outcome(cell.label, "failed", str(path), str(e), stale)
    status = "skipped" if before is not None and _stamp(path) == before else "ran"
    return Outcome(cell.label, status, str(path), stale=stale)


def stale_summary(outcomes: list[Outcome]) -> str:
    """``re-ran 2 stale cells: eval_data changed`` for the cells whose record was made for another cell; "" if none."""
    stale = [o for o in outcomes if o.stale]
    if not stale:
        return ""
    why: dict[str, int] = {}
    for o in stale:
        key = " and ".join(o.stale)
        why[key] = why.get(key, 0) + 1
    reasons = ", ".join(f"{k} changed" + (f" ({n})" if len(why) > 1 else "") for k, n in why.items())
    return f"re-ran {len(stale)} stale cell{'s' * (len(stale) > 1)}: {reasons}"


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


def _ray_cell(cell: Cell, force: bool, threads: int, wait: bool) -> Outcome:
    """A cell as a Ray task (module-level so workers import it rather than unpickle it)."""
    _init_worker(threads)
    return run_cell(cell, force, wait)


def _not_run(cell: Cell) -> Outcome:
    return Outcome(cell.label, "not run", str(cell.path), "the sweep stopped at the full disk reported above")


def _worker_died(cell: Cell, what: str) -> Outcome:
    return Outcome(cell.label, "failed", str(cell.path), f"{what} running it died; re-run the sweep to resume the "
                   "cell from its last checkpoint")


def check_writable(out: Path) -> None:
    """A UserError unless a file can be created, written and deleted in ``out`` (made if missing): a read-only or
    full ``--out`` is refused before any training, not after the first run."""
    try:
        probe_writable(out)
    except DiskFullError:
        raise UserError(f"--out {out}: the disk is full: free space and re-run; nothing was run") from None
    except OSError as e:
        raise UserError(f"--out {out} is not writable ({e.strerror or e}): make it writable or choose another "
                        "--out; nothing was run") from None


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
    for out in sorted({c.out for c in cells}):
        check_writable(Path(out))
    outcomes: list[Outcome | None] = [None] * len(cells)
    counts = {"ran": 0, "skipped": 0, "failed": 0, "not run": 0}
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
        stop, later = False, []
        for i, c in enumerate(cells):
            o = _not_run(c) if stop else run_cell(c, force, wait=False)
            if o.status == "busy":  # another sweep runs it: come back to it at the end
                later.append(i)
                continue
            done(i, o)
            stop = stop or o.stop
        for i in later:  # wait for the other sweep, then skip the cell (or run it, had the other failed)
            o = _not_run(cells[i]) if stop else run_cell(cells[i], force)
            done(i, o)
            stop = stop or o.stop
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
        futures: dict[Future, int] = {pool.submit(run_cell, c, force, False): i for i, c in enumerate(cells)}
        stop = False
        while futures:
            finished, _ = wait_any(futures, return_when=FIRST_COMPLETED)
            for f in finished:
                i = futures.pop(f)
                try:
                    o = f.result()
                except BrokenProcessPool:
                    o = _worker_died(cells[i], "a worker process of the pool")
                if o.status == "busy" and not stop:  # held by another sweep: wait for it after the others
                    futures[pool.submit(run_cell, cells[i], force, True)] = i
                    continue
                done(i, _not_run(cells[i]) if o.status == "busy" else o)
                if o.stop and not stop:
                    stop = True
                    for g in [g for g in futures if g.cancel()]:
                        j = futures.pop(g)
                        done(j, _not_run(cells[j]))
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
    # max_retries=0: a cell whose worker dies (killed, out of memory, node lost) is reported, not retried; a
    # re-run of the sweep resumes it from its checkpoint (docs/faults.md)
    try:
        task = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=0)(_ray_cell)
        refs = {task.remote(c, force, cpus, False): i for i, c in enumerate(cells)}
        stop = False
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1)
            for r in ready:
                i = refs.pop(r)
                try:
                    o = ray.get(r)
                except ray.exceptions.TaskCancelledError:
                    o = _not_run(cells[i])
                except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
                        ray.exceptions.OutOfMemoryError, ray.exceptions.LocalRayletDiedError) as e:
                    o = _worker_died(cells[i], f"the Ray worker ({type(e).__name__})")
                if o.status == "busy" and not stop:  # held by another sweep: wait for it after the others
                    refs[task.remote(cells[i], force, cpus, True)] = i
                    continue
                done(i, _not_run(cells[i]) if o.status == "busy" else o)
                if o.stop and not stop:
                    stop = True
                    for p in refs:
                        ray.cancel(p)
    finally:
        ray.shutdown()
