"""Run records in other tools' formats: Hugging Face eval results, Every Eval Ever, lm-eval (docs/export.md)."""
from __future__ import annotations

import hashlib
import json
import math
import statistics
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import yaml

from ..atomic import write_text
from ..errors import UserError, did_you_mean
from ..metrics import METRICS
from ..records import RunRecord, slug
from .leaderboard import Found, read_sources, row_label

EEE_SCHEMA_VERSION = "0.3.0"  # the Every Eval Ever schema these files follow
BOUNDED = {"exact_match", "multiple_choice", "mc"}  # scorers whose scores lie in [0, 1]
# The range of a built-in metric when every score it reads lies in [0, 1]: task scores (R) or probe scores (P).
TASK_RANGE = {"acc": (0, 1), "plasticity": (0, 1), "bwt": (-1, 1), "fwt": (-1, 1), "forgetting": (-1, 1)}
PROBE_RANGE = {"probe_retention": (-1, 1), "probe_avg_final": (0, 1), "probe_avg_initial": (0, 1)}
LM_EVAL_METRIC = {"multiple_choice": "acc", "mc": "acc"}  # clsuite scorer -> lm-eval's name for the same number
LM_EVAL_FIXED = {"name", "alias", "sample_len", "sample_count"}  # keys of an lm-eval result that carry no filter
LOWER_IS_BETTER = {"perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte"}  # other numbers: higher


class Score:
    """One task's or probe's scores in a run: after each row of R or P, its scorer and per-item values."""

    def __init__(self, r: RunRecord, name: str, role: str, column: list[float], detail: dict[str, Any]) -> None:
        self.name, self.role, self.column, self.detail = name, role, column, detail
        self.final = column[-1]
        self.scoring = (getattr(r, "scoring", None) or {}).get(name, {})
        self.scorer = str(self.scoring.get("scorer", "unknown"))
        self.category = r.probe_categories.get(name, "") if role == "probe" else ""
        items = detail.get("items")  # a list, or 0/1 values as a string of digits (clsuite.records.item_scores)
        items = [int(c) for c in items] if isinstance(items, str) and items.isdigit() else items
        self.items = [float(x) for x in items] if isinstance(items, list) and items else None

    @property
    def higher_is_better(self) -> bool:
        from ..scoring import SCORERS  # loads torch: only when asked
        return SCORERS.get(self.scorer).higher_is_better if self.scorer in SCORERS else True

    @property
    def bounds(self) -> tuple[float | str, float | str]:
        return (0, 1) if self.scorer in BOUNDED else ("-Infinity", "Infinity")

    def spread(self) -> tuple[float, float, int] | None:
        """(standard deviation, standard error, n) of the final per-item values, when the record has them."""
        if self.items is None or len(self.items) < 2:
            return None
        sd = statistics.stdev(self.items)
        return sd, sd / math.sqrt(len(self.items)), len(self.items)


def scores(r: RunRecord) -> list[Score]:
    """Each task's, then each probe's, scores in a complete record."""
    details = getattr(r, "details", None)
    last = details[-1] if isinstance(details, list) and len(details) == len(r.R) else {}
    out = [Score(r, t, "task", [row[i] for row in r.R], last.get("tasks", {}).get(t, {}))
           for i, t in enumerate(r.tasks)]
    return out + [Score(r, p, "probe", [row[i] for row in r.P], last.get("probes", {}).get(p, {}))
                  for i, p in enumerate(r.probes)]


def metrics(r: RunRecord) -> list[tuple[str, float, Any]]:
    """(name, value, the registry's Metric) for each registered metric the record has a number for."""
    return [(m, float(v), METRICS.get(m)) for m, v in r.metrics.items()
            if m in METRICS and isinstance(v, (int, float)) and math.isfinite(v)]


def metric_bounds(r: RunRecord, name: str) -> tuple[float | str, float | str]:
    """A built-in metric's range when the scores it reads are bounded, else unbounded (``"-Infinity"``, ...)."""
    by_role = {"task": [], "probe": []}
    for s in scores(r):
        by_role[s.role].append(s.scorer in BOUNDED)
    if name in TASK_RANGE and all(by_role["task"]):
        return TASK_RANGE[name]
    if name in PROBE_RANGE and by_role["probe"] and all(by_role["probe"]):
        return PROBE_RANGE[name]
    return "-Infinity", "Infinity"


def _component(text: str) -> str:
    """A portable path component of record text (untrusted): no separators, no leading or trailing dots."""
    part = slug(str(text)).strip(". ") or "x"
    return part + "_" if part.lower() == "data" else part  # 'data' is reserved in Every Eval Ever's datastore


def run_name(r: RunRecord) -> str:
    """The run's relative folder: ``<stream>/<strategy>/[<tag>/]seed<k>`` (``seed<k>.val`` for a validation run)."""
    seed = f"seed{r.seed}" + ("" if r.split == "test" else f".{r.split}")
    return "/".join([_component(r.stream), _component(r.strategy), *([_component(r.tag)] if r.tag else []), seed])


def _describe(r: RunRecord) -> str:
    return (f"{row_label(r.strategy, r.tag)} seed {r.seed} on clsuite stream {r.stream} (tasks in training order: "
            f"{' -> '.join(r.tasks)}; {r.split} split)")


# ---- Hugging Face .eval_results

def eval_results(r: RunRecord, dataset: str | None = None) -> dict[str, str]:
    """A model repo's ``.eval_results/<stream>.yaml``: one entry per metric, then per task and probe (its score
    after the last experience); ``dataset``: the Hub benchmark dataset id (default: the stream's name)."""
    ds = dataset or r.stream
    entries = []
    for name, value, m in metrics(r):
        direction = "higher" if m.higher_is_better else "lower"
        entries.append({"dataset": {"id": ds, "task_id": name}, "value": value,
                        "notes": f"{_describe(r)}: {m.formula}; {direction} is better"})
    for s in scores(r):
        entries.append({"dataset": {"id": ds, "task_id": f"{s.role}.{s.name}"}, "value": s.final,
                        "notes": f"{_describe(r)}: {s.scorer} score on {s.role} {s.name} after the last experience"})
    text = yaml.safe_dump(entries, sort_keys=False, allow_unicode=True, width=1000)
    return {f"{run_name(r)}/.eval_results/{_component(r.stream)}.yaml": text}


# ---- Every Eval Ever

def model_identity(model: str) -> tuple[str, str, str]:
    """(model_info.id, developer, model folder): a hub id ``org/name`` as it is; a registered (flat) name is
    clsuite's; a local path is ``local``'s, by its folder name."""
    parts = model.split("/")
    if len(parts) == 2 and all(parts) and not model.startswith((".", "~")) and not Path(model).exists():
        return model, _component(parts[0]), _component(parts[1])
    if len(parts) == 1:
        return model, "clsuite", _component(model)
    name = _component(Path(model).name)
    return name, "local", name


def _strings(d: dict[str, Any]) -> dict[str, str]:
    """``additional_details``: every value a string (JSON for anything but a string)."""
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in d.items() if v is not None}


def eee_uuid(r: RunRecord) -> str:
    """A UUID4-shaped id fixed by the run (exporting a run again names the same file)."""
    key = json.dumps([r.stream, r.strategy, r.tag, r.seed, r.split, r.model, r.fingerprint], sort_keys=True)
    return str(uuid.UUID(bytes=hashlib.sha256(key.encode()).digest()[:16], version=4))


def every_eval_ever(r: RunRecord, organization: str = "clsuite", now: float | None = None) -> dict[str, str]:
    """An Every Eval Ever aggregate record, ``data/<collection>/<developer>/<model>/<uuid>.json``: one result per
    metric, then per task and probe; the stream's order, R and P go in ``additional_details`` (docs/export.md)."""
    model_id, developer, folder = model_identity(r.model)
    versions = r.provenance.get("versions", {}) if isinstance(r.provenance.get("versions"), dict) else {}
    retrieved = f"{time.time() if now is None else now:.0f}"
    name = f"clsuite-{r.stream}-{row_label(r.strategy, r.tag)}-seed{r.seed}-{r.split}"
    stream_data = {"dataset_name": r.stream, "source_type": "other",
                   "additional_details": _strings({"task_order": r.tasks, "probes": r.probes, "split": r.split})}
    run = _strings({"stream": r.stream, "strategy": r.strategy, "tag": r.tag, "seed": r.seed, "split": r.split,
                    "task_order": r.tasks, "probes": r.probes, "probe_categories": r.probe_categories, "R": r.R,
                    "P": r.P, "rows": "R and P: row 0 before training, row i after training on the i-th task",
                    "fingerprint": r.fingerprint})
    results = []
    for m, value, metric in metrics(r):
        lo, hi = metric_bounds(r, m)
        results.append({
            "evaluation_result_id": f"metric.{m}", "evaluation_name": f"{r.stream}: {m}", "source_data": stream_data,
            "metric_config": {"evaluation_description": metric.formula, "metric_id": f"clsuite.{m}", "metric_name": m,
                              "metric_kind": "continual_learning", "lower_is_better": not metric.higher_is_better,
                              "score_type": "continuous", "min_score": lo, "max_score": hi},
            "score_details": {"score": value}})
    for s in scores(r):
        lo, hi = s.bounds
        details = {"scores_after_each_experience": s.column, "scorer": s.scorer, "role": s.role,
                   **({"category": s.category} if s.category else {}),
                   **{k: v for k, v in s.scoring.items() if k != "scorer"}}
        entry = {
            "evaluation_result_id": f"{s.role}.{s.name}", "evaluation_name": s.name,
            "source_data": {"dataset_name": s.name, "source_type": "other",
                            "additional_details": _strings({"stream": r.stream, "role": s.role, "split": r.split})},
            "metric_config": {"evaluation_description": f"{s.scorer} score on {s.role} {s.name} of stream "
                                                        f"{r.stream} after the last experience",
                              "metric_id": f"clsuite.{s.scorer}", "metric_name": s.scorer,
                              "lower_is_better": not s.higher_is_better, "score_type": "continuous",
                              "min_score": lo, "max_score": hi},
            "score_details": {"score": s.final, "details": _strings(details)}}
        if s.spread() is not None:
            sd, se, n = s.spread()
            entry["score_details"]["uncertainty"] = {"standard_error": {"value": se, "method": "analytic"},
                                                     "standard_deviation": sd, "num_samples": n}
        results.append(entry)
    doc = {
        "schema_version": EEE_SCHEMA_VERSION,
        "evaluation_id": f"{name}/{model_id}/{retrieved}",
        "retrieved_timestamp": retrieved,
        "source_metadata": {"source_name": "clsuite run record", "source_type": "evaluation_run",
                            "source_organization_name": organization, "evaluator_relationship": "other",
                            "additional_details": run},
        "eval_library": {"name": "clsuite", "version": str(versions.get("clsuite") or "unknown"),
                         "additional_details": _strings({
                             "record_schema_version": r.schema_version, "git_commit": r.provenance.get("git_commit"),
                             "git_dirty": r.provenance.get("git_dirty")})},
        "model_info": {"name": f"{r.model} after {row_label(r.strategy, r.tag)} on {r.stream} (seed {r.seed})",
                       "id": model_id, "developer": developer,
                       "inference_engine": {"name": "transformers",
                                            "version": str(versions.get("transformers") or "unknown")},
                       "additional_details": {"deployment_type": "self_deployed", "model_availability": "unknown",
                                              **_strings({"base_model": r.model, "strategy": r.strategy,
                                                          "tag": r.tag, "seed": r.seed, "config": r.config})}},
        "evaluation_results": results,
    }
    path = f"data/{_component('clsuite-' + r.stream)}/{developer}/{folder}/{eee_uuid(r)}.json"
    return {path: json.dumps(doc, indent=1, allow_nan=False) + "\n"}


# ---- lm-evaluation-harness

def _lm_eval_result(s: Score) -> tuple[dict[str, Any], dict[str, bool], int | None]:
    """(the task's entry under ``results``, its higher_is_better, documents scored)."""
    row: dict[str, Any] = {"alias": s.name}
    if s.scorer == "lm_eval":  # lm-eval's own numbers, kept by the probe without their ',none' filter
        for k, v in s.detail.items():
            if k in LM_EVAL_FIXED:
                row[k] = v
            elif k not in ("score", "n_samples", "items") and isinstance(v, (int, float)) and not isinstance(v, bool):
                row[k if "," in k else f"{k},none"] = v
        if len(row) == 1:
            row["score,none"] = s.final
        n = int(s.detail["n_samples"]) if isinstance(s.detail.get("n_samples"), (int, float)) else None
        names = [k.split(",")[0] for k in row if "," in k]
        return row, {m: m not in LOWER_IS_BETTER and s.higher_is_better for m in names}, n
    metric = LM_EVAL_METRIC.get(s.scorer, s.scorer)
    row[f"{metric},none"] = s.final
    hib = {metric: s.higher_is_better}
    if s.spread() is not None:
        row[f"{metric}_stderr,none"] = s.spread()[1]
    for k, v in s.detail.items():  # other numbers the scorer reported (e.g. perplexity)
        if k not in ("score", "items") and not k.startswith("item") and isinstance(v, (int, float)) \
                and not isinstance(v, bool):
            row[f"{k},none"] = v
            if k in LOWER_IS_BETTER:
                hib[k] = False
    return row, hib, len(s.items) if s.items is not None else None


def lm_eval(r: RunRecord) -> dict[str, str]:
    """lm-eval's ``results.json`` layout for the run's tasks and probes after the last experience; the
    continual-learning part (order, R, P, metrics) goes under ``clsuite``."""
    results, configs, versions, n_shot, hib, n_samples = {}, {}, {}, {}, {}, {}
    for s in scores(r):
        results[s.name], hib[s.name], n = _lm_eval_result(s)
        versions[s.name] = None  # lm-eval task versions; a clsuite task has none, a record keeps none for lm-eval's
        if n is not None:
            n_samples[s.name] = {"original": n, "effective": n}
        ours = {"role": s.role, **s.scoring, **({"category": s.category} if s.category else {})}
        configs[s.name] = {"task": s.name, "metadata": {"clsuite": ours}}
        if s.scorer != "lm_eval":
            n_shot[s.name] = 0  # clsuite's scorers prompt without examples
            configs[s.name]["num_fewshot"] = 0
    versions_of = r.provenance.get("versions", {}) if isinstance(r.provenance.get("versions"), dict) else {}
    ecfg = r.config.get("eval", {}) if isinstance(r.config.get("eval"), dict) else {}
    doc = {
        "results": results, "group_subtasks": {}, "configs": configs, "versions": versions, "n-shot": n_shot,
        "higher_is_better": hib, "n-samples": n_samples,
        "config": {"model": r.model, "model_args": None, "batch_size": ecfg.get("batch_size"),
                   "limit": ecfg.get("max_examples"), "bootstrap_iters": 0},
        "git_hash": r.provenance.get("git_commit"),
        "transformers_version": versions_of.get("transformers"),
        "model_source": "hf", "model_name": r.model, "model_name_sanitized": r.model.replace("/", "__"),
        "clsuite": {"stream": r.stream, "strategy": r.strategy, "tag": r.tag, "seed": r.seed, "split": r.split,
                    "tasks": r.tasks, "probes": r.probes, "probe_categories": r.probe_categories, "R": r.R,
                    "P": r.P, "metrics": r.metrics, "fingerprint": r.fingerprint,
                    "schema_version": r.schema_version},
    }
    return {f"{run_name(r)}/results.json": json.dumps(doc, indent=2, allow_nan=False) + "\n"}


FORMATS: dict[str, Callable[..., dict[str, str]]] = {"eval-results": eval_results,
                                                     "every-eval-ever": every_eval_ever, "lm-eval": lm_eval}


def export(paths: list[Path], fmt: str, out: Path, **options: Any) -> tuple[list[Path], list[str]]:
    """Write every complete record under ``paths`` (files, directories, .zip archives) in format ``fmt`` under
    ``out``, each file atomically; ``options`` go to the format's function. Returns (files written, lines for the
    failed runs skipped)."""
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}: {did_you_mean(fmt, FORMATS)}choose one of "
                        f"{', '.join(FORMATS)}")
    found = read_sources(paths)
    if not found:
        raise UserError(f"no run records under {', '.join(map(str, paths))}: run 'clsuite run' first")
    skipped = [f"{x.where}: a failed run ({row_label(x.record.strategy, x.record.tag)} seed {x.record.seed}), "
               "not exported" for x in found if x.record.status != "complete"]
    files: dict[str, tuple[str, Found]] = {}
    for x in (x for x in found if x.record.status == "complete"):
        for rel, text in FORMATS[fmt](x.record, **options).items():
            if rel in files:
                raise UserError(f"{files[rel][1].where} and {x.where} are both "
                                f"{row_label(x.record.strategy, x.record.tag)} seed {x.record.seed} on "
                                f"{x.record.stream}: export each run once (give only one of them)")
            files[rel] = (text, x)
    if not files:
        raise UserError("every record found is a failed run: nothing to export")
    written = []
    for rel, (text, _) in files.items():  # every part of rel is a _component: it stays inside out
        write_text(Path(out) / rel, text)
        written.append(Path(out) / rel)
    return written, skipped
