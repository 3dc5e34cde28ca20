"""The ``clsuite`` command line: run, sweep, tune, migrate, list, leaderboard, site, export, show, plan, overlap,
landscape, landscape-compare, correlate."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from .errors import DivergenceError, UserError, did_you_mean

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Continual-learning benchmarks for language models.")


def _overrides(pairs: list[str]) -> dict:
    import yaml
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--set {pair!r}: write KEY=VALUE, e.g. --set lr=1e-4")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise UserError(f"--set {pair!r}: the value is not valid YAML; quote it or fix it, e.g. --set lr=1e-4") from None
    return out


def _quiet_libraries(quiet: bool) -> None:
    """--quiet also silences the progress bars of transformers (weight loading) and datasets (map, load)."""
    if quiet:
        import datasets
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
        datasets.disable_progress_bars()


@app.command()
def run(
    stream: str = typer.Option(..., help="built-in stream name or a stream .yaml file"),
    strategies: str = typer.Option("naive", help="comma-separated specs, e.g. 'naive,sam(rho=0.05)+ewc'"),
    seeds: str = typer.Option("0", help="comma-separated seeds"),
    model: Optional[str] = typer.Option(None, help="registered model, hub id or local path (default: the stream's)"),
    out: Path = typer.Option(Path("runs"), help="directory for run records"),
    set_: list[str] = typer.Option([], "--set", help="training override KEY=VALUE (repeatable), e.g. --set steps=20"),
    force: bool = typer.Option(False, help="re-run cells that already have a record"),
    leaderboard: Optional[Path] = typer.Option(None, help="also publish a leaderboard under this directory"),
    quiet: bool = typer.Option(False, help="no progress bars"),
    sharpness: str = typer.Option("off", help="sharpness after each experience: off | worst | cheap | full"),
    save_model: bool = typer.Option(False, help="also save each run's final model beside its record (seed<k>.model/)"),
    resume: bool = typer.Option(False, help="continue interrupted cells from their last experience checkpoint "
                                "(seed<k>.ckpt/ beside the record)"),
) -> None:
    """Run every (strategy, seed) cell over a stream; each run writes one JSON record."""
    from .distributed import is_main
    from .config import resolve_config
    from .runner import run_one
    from .spec import split_specs
    from .streams import load_stream
    _quiet_libraries(quiet)
    try:
        seed_list = [int(s) for s in seeds.split(",")]
    except ValueError:
        raise UserError(f"--seeds {seeds!r}: give comma-separated integers, e.g. 0,1,2") from None
    specs = split_specs(strategies)
    s = load_stream(stream)
    configs = [resolve_config(s, spec, seed, model, _overrides(set_), {"sharpness": sharpness})
               for spec in specs for seed in seed_list]
    failed = 0
    for cfg in configs:
        try:
            path = run_one(s, cfg, out, progress=not quiet, force=force, save=save_model, resume=resume)
            if is_main():  # under torchrun rank 0 writes the records
                typer.echo(f"wrote {path}")
        except DivergenceError as e:
            failed += 1
            if is_main():
                typer.echo(f"run failed ({cfg.strategy}, seed {cfg.seed}): {e}", err=True)
    if leaderboard is not None and is_main():
        from .reports.leaderboard import publish
        for name, md in publish([out / s.name], leaderboard).items():
            typer.echo(f"\n{name}  ({leaderboard / name / 'leaderboard.md'})\n{md}")
    if failed:
        raise typer.Exit(1)


@app.command()
def sweep(
    grid: Path = typer.Argument(..., help="grid YAML: streams, strategies, seeds, set (lists of training settings)"),
    backend: str = typer.Option("local", help="local | ray"),
    workers: Optional[int] = typer.Option(None, help="local: parallel processes (default 1: in-process); "
                                          "ray: runs at once on the local cluster it starts"),
    address: Optional[str] = typer.Option(None, help="ray: an existing cluster, e.g. auto (default: start one)"),
    cpus_per_run: Optional[int] = typer.Option(None, help="ray: CPUs (and torch threads) per run (default 1)"),
    gpus_per_run: Optional[float] = typer.Option(None, help="ray: GPUs per run, fractions allowed (default 0)"),
    out: Path = typer.Option(Path("runs"), help="directory for run records (shared by all nodes under Ray)"),
    leaderboard: Optional[Path] = typer.Option(None, help="also publish a leaderboard under this directory"),
    force: bool = typer.Option(False, help="re-run cells that already have a record"),
    dry_run: bool = typer.Option(False, help="list the cells and their record paths, run nothing"),
    quiet: bool = typer.Option(False, help="no progress bar"),
) -> None:
    """Run every cell of a grid (stream x strategy x settings x seed), locally or on Ray; resumable."""
    from .sweep import check_options, expand, load_grid, run_cells, stale_summary
    _quiet_libraries(quiet)  # in this process; pool and Ray workers show their own
    check_options(backend, workers, address, cpus_per_run, gpus_per_run)
    cells = expand(load_grid(grid), grid, out)
    if dry_run:
        for c in cells:
            typer.echo(f"{c.label}  ->  {c.path}")
        typer.echo(f"{len(cells)} cells")
        return
    outcomes = run_cells(cells, backend, workers, address, cpus_per_run, gpus_per_run, force, progress=not quiet)
    for o in outcomes:
        if o.status == "failed":
            typer.echo(f"run failed ({o.label}): {o.error}", err=True)
    n = {k: sum(o.status == k for o in outcomes) for k in ("ran", "skipped", "failed", "not run")}
    typer.echo(f"sweep: {len(cells)} cells: {n['ran']} ran, {n['skipped']} skipped, {n['failed']} failed"
               + (f", {n['not run']} not run (the sweep stopped at the error above)" if n["not run"] else ""))
    if stale_summary(outcomes):
        typer.echo(stale_summary(outcomes))
    if leaderboard is not None and n["ran"] + n["skipped"] == 0:
        typer.echo("leaderboard not written: no cell of this sweep completed", err=True)
    elif leaderboard is not None:
        from .reports.leaderboard import publish
        dirs = sorted({Path(c.out) / c.path.relative_to(c.out).parts[0] for c in cells if c.path.exists()})
        for name, md in publish(dirs, leaderboard).items():
            typer.echo(f"\n{name}  ({leaderboard / name / 'leaderboard.md'})\n{md}")
    if n["failed"]:
        raise typer.Exit(1)


@app.command()
def tune(
    grid: Path = typer.Argument(..., help="tuning grid YAML: per-strategy spaces, tuning_seeds, test_seeds, rule"),
    out: Path = typer.Option(Path("runs/tune"), help="val/ and test/ records and <stream>/selected.yaml go here"),
    test_seeds: Optional[str] = typer.Option(None, help="comma-separated test seeds (default: the grid's "
                                             "test_seeds); disjoint from its tuning_seeds"),
    backend: str = typer.Option("local", help="local | ray, as for clsuite sweep"),
    workers: Optional[int] = typer.Option(None, help="local: parallel processes (default 1: in-process); "
                                          "ray: runs at once on the local cluster it starts"),
    address: Optional[str] = typer.Option(None, help="ray: an existing cluster, e.g. auto (default: start one)"),
    cpus_per_run: Optional[int] = typer.Option(None, help="ray: CPUs (and torch threads) per run (default 1)"),
    gpus_per_run: Optional[float] = typer.Option(None, help="ray: GPUs per run, fractions allowed (default 0)"),
    leaderboard: Optional[Path] = typer.Option(None, help="also publish the protocol leaderboard under this directory"),
    quiet: bool = typer.Option(False, help="no progress bar"),
) -> None:
    """Select each strategy's setting on validation, then run it on the test seeds (docs/protocol.md); resumable."""
    from .sweep import check_options, run_cells
    from .tune import run_tune
    _quiet_libraries(quiet)
    check_options(backend, workers, address, cpus_per_run, gpus_per_run)
    seeds = None
    if test_seeds is not None:
        try:
            seeds = [int(s) for s in test_seeds.split(",")]
        except ValueError:
            raise UserError(f"--test-seeds {test_seeds!r}: give comma-separated integers, e.g. 0,1,2,3,4") from None
    written = run_tune(grid, out, seeds, lambda cells: run_cells(cells, backend, workers, address, cpus_per_run,
                                                                gpus_per_run, progress=not quiet))
    for stream, path in written.items():
        typer.echo(f"selected: {path}")
        if leaderboard is not None:
            from .reports.protocol import publish_protocol
            md = publish_protocol(out, stream, leaderboard / stream)
            typer.echo(f"\n{stream}  ({leaderboard / stream / 'leaderboard.md'})\n{md}")


@app.command()
def migrate(
    dirs: list[Path] = typer.Argument(..., help="directories (or files) of run records"),
    stream: Optional[str] = typer.Option(None, help="the stream to fingerprint them with (default: each record's "
                                         "stream name, as a built-in stream)"),
    dry_run: bool = typer.Option(False, help="say what would be migrated, write nothing"),
) -> None:
    """Bring older records to the current schema when their fingerprint shows the stream's data is unchanged."""
    from .records import MIGRATION_NOTE, migrate_records as run_migration
    done, left = run_migration(dirs, stream, dry_run)
    for line in left:
        typer.echo(f"left: {line}", err=True)
    typer.echo(f"{'would migrate' if dry_run else 'migrated'} {len(done)} record{'s' * (len(done) != 1)}, "
               f"left {len(left)}; {MIGRATION_NOTE}")
    if left:
        raise typer.Exit(1)


@app.command("list")
def list_(what: str = typer.Argument(
        "all", help="streams | strategies | kinds | metrics | scorers | builders | models | rules | all")) -> None:
    """List what the registries hold: streams, strategies (kind, parameters, conflicts), how kinds combine, metrics
    (direction, shown, claim sign, formula), scorers, data builders, models and tuning's selection rules."""
    from .metrics import METRICS
    from .models import MODELS
    from .scoring import SCORERS
    from .strategy import KINDS, SINGLE_KINDS, STACKING, STRATEGIES
    from .streams import DATA_BUILDERS, builtin_stream_files
    from .tune import RULES

    def doc(obj: object) -> str:
        return next(iter((getattr(obj, "__doc__", None) or "").strip().splitlines()), "")

    def also(name: str, registry) -> str:
        aliases = registry.aliases_of(name)
        return f" (also {', '.join(aliases)})" if aliases else ""

    def strategies() -> list[str]:
        lines = []
        for name, cls in STRATEGIES.items():
            lines.append(f"{name:10s} [{cls.kind}] {cls.description}{also(name, STRATEGIES)}")
            params = ", ".join(f"{f.alias or k}={f.default!r}" for k, f in cls.Params.model_fields.items())
            if params:
                lines.append(f"{'':12s}params: {params}")
            for c in cls.conflicts:
                lines.append(f"{'':12s}refuses: {c.describe(name)}")
        return lines

    def metrics() -> list[str]:
        return [f"{name:22s} {'higher' if m.higher_is_better else 'lower':6s} is better  "
                f"{'shown ' if m.shown else 'hidden'}  {'no claim' if m.claim_sign is None else f'claim {m.claim_sign:+d}'}"
                f"  {m.formula}" for name, m in METRICS.items()]

    sections = {
        "streams": lambda: [f"{name:24s} {path}" for name, path in builtin_stream_files().items()],
        "strategies": strategies,
        "kinds": lambda: [f"{k:16s} " + (f"at most one: {SINGLE_KINDS[k]}" if k in SINGLE_KINDS
                                         else f"several: {STACKING[k]}") for k in KINDS],
        "metrics": metrics,
        "scorers": lambda: [f"{name:16s} {'higher' if s.higher_is_better else 'lower':6s} is better: {doc(s.fn)}"
                            f"{also(name, SCORERS)}" for name, s in SCORERS.items()],
        "builders": lambda: [f"{name:24s} {doc(fn)}" for name, fn in DATA_BUILDERS.items()],
        "models": lambda: [f"{name:24s} {doc(fn)}" for name, fn in MODELS.items()] + ["(or any hub id / local path)"],
        "rules": lambda: [f"{name:24s} {doc(fn)}" for name, fn in RULES.items()],
    }
    if what != "all" and what not in sections:
        raise UserError(f"cannot list {what!r}: {did_you_mean(what, sections)}choose {', '.join(sections)} or all")
    for name, lines in sections.items():
        if what in ("all", name):
            typer.echo(f"{name}:")
            for line in lines():
                typer.echo(f"  {line}")


@app.command()
def leaderboard(
    records: list[Path] = typer.Argument(..., help="run-record files, directories or .zip archives of them"),
    out: Path = typer.Option(Path("leaderboards"), help="where <stream>/leaderboard.{md,csv,png} go"),
    sort: str = typer.Option("acc", help="metric to rank by"),
    prefer: list[str] = typer.Option([], "--prefer", help="the source (a path as given) whose record counts when "
                                     "two sources hold the same run (repeatable: the first named wins)"),
) -> None:
    """Aggregate records (mean ± 95% t interval over seeds) into ranked markdown and CSV tables; a directory made
    by clsuite tune gets the protocol leaderboard (selected settings, paired effects, matched, equal compute).
    Records may come from several directories, files and .zip archives; each row then names its sources."""
    from .reports.leaderboard import publish
    from .reports.protocol import publish_protocol, tuned_streams
    plain = [r for r in records if not tuned_streams(r)]
    for r in [r for r in records if tuned_streams(r)]:
        for name in tuned_streams(r):
            typer.echo(f"{name}  ({out / name / 'leaderboard.md'})\n{publish_protocol(r, name, out / name)}\n")
    for name, md in (publish(plain, out, sort, prefer) if plain else {}).items():
        typer.echo(f"{name}  ({out / name / 'leaderboard.md'})\n{md}\n")


@app.command()
def show(record: Path = typer.Argument(..., help="a run-record .json")) -> None:
    """Print one run: its matrices, metrics and cost."""
    from tabulate import tabulate
    from .records import read_record
    r = read_record(record)
    typer.echo(f"{r.stream} | {r.strategy} | seed {r.seed} | model {r.model} | {r.status}")
    if r.status == "failed":
        typer.echo(f"error: {r.error}")
        return
    rows = [[f"after {r.tasks[i - 1]}" if i else "initial", *row, *p] for i, (row, p) in enumerate(zip(r.R, r.P))]
    typer.echo(tabulate(rows, headers=["", *r.tasks, *[f"probe:{p}" for p in r.probes]], floatfmt=".3f"))
    typer.echo(json.dumps({"metrics": r.metrics, "cost": r.cost, "wall_seconds": r.wall_seconds}, indent=1))


@app.command()
def plan(
    model: Optional[str] = typer.Option(None, help="registered model, local directory, hub id or known config "
                                        "(llama-2-7b, llama-2-13b; default: the stream's)"),
    strategies: str = typer.Option("naive", help="comma-separated specs, e.g. 'naive,sam+ewc'"),
    processes: int = typer.Option(1, help="processes (GPUs) the run is spread over"),
    parallel: str = typer.Option("ddp", help="ddp (each process holds everything) | fsdp (sharded over processes)"),
    stream: Optional[str] = typer.Option(None, help="the stream whose batch, length and tasks are planned "
                                         "(default: TrainConfig's defaults, one task)"),
    set_: list[str] = typer.Option([], "--set", help="training override KEY=VALUE, as for clsuite run"),
    device_gb: Optional[float] = typer.Option(None, help="say whether the peak fits a device of this many GiB"),
) -> None:
    """Estimate the memory per process of a run, component by component, and whether it fits (docs/memory.md)."""
    from .plan import make_plans, render
    from .spec import split_specs
    for p in make_plans(split_specs(strategies), model, stream, processes, parallel, _overrides(set_)):
        typer.echo(render(p, device_gb) + "\n")


@app.command()
def overlap(
    stream: str = typer.Option(..., "--stream", help="a built-in stream name or a stream YAML"),
    n: int = typer.Option(4, "--n", min=1, help="word n-gram length"),
) -> None:
    """Contamination check: for each task (and the general data) and each probe, the share of probe items whose gold
    answer occurs in the training rows, is a training target, or shares a word n-gram with them."""
    from tabulate import tabulate

    from .overlap import stream_overlap
    from .streams import load_stream
    rows = stream_overlap(load_stream(stream), n)
    print(tabulate([[r["task"], r["probe"], r["items"], f"{r['answer']:.1%}", f"{r['target']:.1%}",
                     f"{r['ngram']:.1%}"] for r in rows],
                   headers=["training rows", "probe", "items", "answer in text", "answer is a target",
                            f"shares a {n}-gram"], tablefmt="github"))
    for r in rows:
        for kind, ex in r["examples"].items():
            if ex and kind != "answer":
                print(f"{r['task']} / {r['probe']} ({kind}): " + "; ".join(ex))


@app.command()
def landscape(
    stream: str = typer.Option(..., help="built-in stream name or a stream .yaml file"),
    task: str = typer.Option(..., help="name of a task or probe of the stream"),
    checkpoint: Optional[Path] = typer.Option(None, help="a save_pretrained directory (weights + tokenizer); "
                                              "run records carry no weights"),
    model: Optional[str] = typer.Option(None, help="registered model, hub id or local path (default: the stream's)"),
    split: str = typer.Option("eval", help="eval | train"),
    n: int = typer.Option(32, "--n", help="examples: the first n rows of the split"),
    grid: int = typer.Option(11, help="points per axis of the 2-D surface (>= 3)"),
    span: float = typer.Option(1.0, help="the surface covers [-span, span]^2 in filter-normalized directions"),
    line_steps: int = typer.Option(0, help="points of an extra 1-D surface along direction 1 (0: none)"),
    out: Optional[Path] = typer.Option(None, help="output directory (default: landscapes/<stream>/<model>)"),
    seed: int = typer.Option(0, help="seed of the random directions and estimators"),
    quiet: bool = typer.Option(False, help="no progress bars"),
) -> None:
    """Loss surface (contour + 3-D PNG, JSON) and sharpness scalars of a model on one task."""
    from .reports.landscape import landscape as compute
    _quiet_libraries(quiet)
    r = compute(stream, task, checkpoint, model, split, n, grid, span, out, seed, line_steps, progress=not quiet)
    typer.echo(json.dumps({"surface_sharpness": r["surface_sharpness"], "sharpness": r["sharpness"]}, indent=1))
    for path in [*r["pngs"], r["json"]]:
        typer.echo(f"wrote {path}")


@app.command("landscape-compare")
def landscape_compare(
    landscapes: list[Path] = typer.Argument(..., help="landscape .json files written by clsuite landscape"),
    out: Path = typer.Option(..., help="the PNG to write"),
) -> None:
    """Contours of several landscapes side by side on one colour scale (e.g. after naive and after SAM)."""
    from .reports.landscape import compare_landscapes
    typer.echo(f"wrote {compare_landscapes(landscapes, out)}")


@app.command()
def correlate(
    records: list[Path] = typer.Argument(..., help="run-record files, directories or .zip archives of them (runs "
                                         "with sharpness)"),
    out: Path = typer.Option(Path("correlations"), help="where correlation.{csv,md,png} and runs.csv go"),
) -> None:
    """Correlate sharpness with forgetting across runs: Spearman (bootstrap CI), Pearson, scatter plots."""
    from .reports.correlate import correlate as compute
    r = compute(records, out)
    typer.echo(r["markdown"])
    for path in r["files"].values():
        typer.echo(f"wrote {path}")


@app.command()
def site(
    records: list[Path] = typer.Argument(..., help="run-record files, directories or .zip archives of them; a "
                                         "'clsuite tune' directory also adds its protocol leaderboard"),
    out: Path = typer.Option(..., help="the site folder, replaced whole (a new one, or one 'clsuite site' wrote)"),
) -> None:
    """A static web leaderboard: a page per stream and per run, sortable and filterable, opened from disk."""
    from .reports.site import write_site
    typer.echo(f"wrote {write_site(records, out)}")


@app.command()
def export(
    records: list[Path] = typer.Argument(..., help="run-record files, directories or .zip archives of them"),
    fmt: str = typer.Option(..., "--format", help="eval-results (Hugging Face .eval_results YAML) | every-eval-ever "
                            "| lm-eval (results.json)"),
    out: Path = typer.Option(..., help="the folder the files go under (docs/export.md has the layout)"),
    hf_dataset: Optional[str] = typer.Option(None, help="eval-results: the Hub benchmark dataset id of the stream "
                                             "(default: the stream's name)"),
    organization: str = typer.Option("clsuite", help="every-eval-ever: source_organization_name, who provides "
                                     "the results"),
) -> None:
    """Export each complete run in a standard format: Hugging Face eval results, Every Eval Ever or lm-eval's."""
    from .reports.export import export as run_export
    options = {"eval-results": {"dataset": hf_dataset}, "every-eval-ever": {"organization": organization}}
    written, skipped = run_export(records, fmt, out, **options.get(fmt, {}))
    for line in skipped:
        typer.echo(f"skipped: {line}", err=True)
    for path in written:
        typer.echo(f"wrote {path}")


def main() -> None:
    try:
        code = app(standalone_mode=False)  # not standalone, click returns typer.Exit(n)'s n instead of exiting
        sys.exit(code if isinstance(code, int) else 0)
    except UserError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except (typer.Exit, SystemExit) as e:
        sys.exit(getattr(e, "exit_code", getattr(e, "code", 0)))
    except KeyboardInterrupt:
        typer.echo("interrupted: finished runs and experiences are saved; re-run the same command with --resume "
                   "to continue", err=True)
        sys.exit(130)
    except Exception as e:
        if hasattr(e, "show") and hasattr(e, "exit_code"):  # a click usage error (typer vendors click)
            e.show()
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
