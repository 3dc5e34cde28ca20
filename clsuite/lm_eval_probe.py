"""Probes scored by lm-evaluation-harness on the in-memory model (docs/lm-eval.md)."""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .errors import UserError, did_you_mean

PROBE_KEYS = ("name", "category", "lm_eval")


class LmEvalSpec(BaseModel):
    """The ``lm_eval:`` block of a probe."""
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    task: str = Field(min_length=1, description="an lm-eval task or group name (e.g. mmlu, arc_challenge)")
    num_fewshot: int | None = Field(None, ge=0, description="None: the task's own default (0 when it has none)")
    limit: int | None = Field(None, ge=1, description="first N documents per task (None: all)")
    metric: str = Field("acc", min_length=1, description="'acc', 'acc_norm', or 'metric,filter'")
    include_path: str | list[str] | None = Field(None, description="folders of the user's task YAMLs")
    include_defaults: bool = Field(True, description="false: index only include_path (faster start)")
    fewshot_seed: int = Field(1234, description="seed of the few-shot sampler (lm-eval's default)")


@dataclass
class LmEvalProbe:
    """A loaded lm-eval probe: its settings, lm-eval's loaded tasks (``TaskManager.load`` output), and what
    identifies its data (lm-eval's version, each task's version and document count), which its repr shows."""
    spec: LmEvalSpec
    data: dict[str, Any]
    loaded: dict[str, Any] = field(repr=False)
    where: str = field(repr=False)

    @property
    def metric_key(self) -> str:
        """The key of the probe's score in lm-eval's results: ``metric,filter`` (filter ``none`` by default)."""
        return self.spec.metric if "," in self.spec.metric else f"{self.spec.metric},none"

    def score(self, model: Any, tokenizer: Any, batch_size: int, max_examples: int | None = None) -> dict[str, float]:
        """Evaluate the in-memory model; ``score`` is the probe's metric, other finite metrics are kept beside it."""
        from lm_eval.evaluator import evaluate
        from lm_eval.models.huggingface import HFLM

        limits = [n for n in (self.spec.limit, max_examples) if n is not None]
        for task in self.loaded["tasks"].values():
            task.set_fewshot_seed(seed=self.spec.fewshot_seed)  # the same few-shot prompts at every evaluation
        was_training = model.training
        try:
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)  # puts the model in eval mode
            out = evaluate(lm, self.loaded, limit=min(limits) if limits else None, bootstrap_iters=0,
                           log_samples=False)
        finally:
            model.train(was_training)
        row = out["results"].get(self.spec.task, {})
        if self.metric_key not in row:
            have = sorted(k for k, v in row.items() if isinstance(v, (int, float)) and "_stderr" not in k)
            raise UserError(f"{self.where}: lm-eval reported no {self.metric_key!r} for {self.spec.task!r} "
                            f"(it reported: {', '.join(have) or 'nothing; a tag has no aggregate score'}); set "
                            "lm_eval.metric to one of those, or name a task or a group that aggregates")
        scores = {k.removesuffix(",none"): float(v) for k, v in row.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool) and "_stderr" not in k
                  and math.isfinite(v)}
        n = sum(int(c.get("effective", 0)) for c in out.get("n-samples", {}).values())
        return {"score": float(row[self.metric_key]), **scores, "n_samples": float(n)}


def _lm_eval_missing() -> UserError:
    return UserError("lm_eval probes need lm-evaluation-harness and the parts of it they use: run "
                     "`pip install 'clsuite[paper]' && pip install --no-deps lm-eval==0.4.13`")


@functools.lru_cache(maxsize=8)
def task_manager(include_path: tuple[str, ...], include_defaults: bool) -> Any:
    """lm-eval's task index (built once per process and setting: indexing its built-in tasks takes seconds)."""
    from lm_eval.tasks import TaskManager
    return TaskManager(include_path=list(include_path) or None, include_defaults=include_defaults)


def _include_paths(spec: LmEvalSpec, where: str) -> tuple[str, ...]:
    raw = spec.include_path
    paths = [] if raw is None else [raw] if isinstance(raw, str) else list(raw)
    for p in paths:
        if not Path(p).is_dir():
            raise UserError(f"{where}: lm_eval.include_path {p!r} is not a folder (relative paths are from the "
                            f"current directory, {Path.cwd()}); give the folder holding your task YAML files")
    return tuple(str(Path(p).resolve()) for p in paths)


def parse_spec(entry: dict, where: str) -> LmEvalSpec:
    """Validate a probe entry with ``lm_eval:``; unknown keys are a one-line UserError naming the allowed ones."""
    from .config import validated
    extra = sorted(map(str, set(entry) - set(PROBE_KEYS)))
    if extra:
        raise UserError(f"{where}: an lm_eval probe takes only {', '.join(PROBE_KEYS)} (lm-eval loads and scores "
                        f"its own data); remove {', '.join(extra)}")
    block = entry["lm_eval"]
    if not isinstance(block, dict):
        raise UserError(f"{where}: 'lm_eval:' must be a mapping such as {{task: mmlu, num_fewshot: 5}}, "
                        f"got {type(block).__name__} {block!r:.60}")
    unknown = sorted(map(str, set(block) - set(LmEvalSpec.model_fields)))
    if unknown:
        raise UserError(f"{where}: unknown key(s) {', '.join(unknown)} in lm_eval:; it takes "
                        f"{', '.join(LmEvalSpec.model_fields)}")
    return validated(LmEvalSpec, block, f"{where}, lm_eval")


def check_task(tm: Any, spec: LmEvalSpec, where: str) -> None:
    """The task is in lm-eval's index and reports ``spec.metric``: checked from its YAML, before any data loads."""
    entry = tm.task_index.get(spec.task)
    if entry is None:
        hint = did_you_mean(spec.task, tm.all_tasks, n=3)
        raise UserError(f"{where}: unknown lm-eval task {spec.task!r}: {hint}list them with `lm-eval ls tasks`; "
                        "for your own YAML files set include_path (lm-eval skips a YAML file it cannot parse)")
    cfg, kind = entry.cfg or {}, entry.kind.name
    if kind == "TAG":
        raise UserError(f"{where}: {spec.task!r} is an lm-eval tag, which reports no score of its own: name one "
                        f"of its tasks, or a group with aggregate_metric_list")
    key = {"GROUP": "aggregate_metric_list", "TASK": "metric_list"}.get(kind)
    listed = [m.get("metric") for m in (cfg.get(key) or []) if isinstance(m, dict)] if key else []
    if kind == "TASK" and not cfg.get(key):  # lm-eval's defaults for the task's output type
        from lm_eval.api.registry import DEFAULT_METRIC_REGISTRY
        listed = list(DEFAULT_METRIC_REGISTRY.get(cfg.get("output_type", "generate_until"), []))
    if kind == "GROUP" and not listed:
        raise UserError(f"{where}: lm-eval group {spec.task!r} has no aggregate_metric_list, so it reports no "
                        "score of its own: name one of its tasks, or a group that aggregates")
    metric = spec.metric.split(",")[0]
    if listed and metric not in listed:
        raise UserError(f"{where}: lm-eval {kind.lower()} {spec.task!r} reports {', '.join(map(str, listed))}, "
                        f"not {metric!r}: set lm_eval.metric to one of those")


def load_probe(entry: dict, where: str) -> LmEvalProbe:
    """Parse a probe's ``lm_eval:`` block and load its lm-eval task(s) with their data."""
    spec = parse_spec(entry, where)
    paths = _include_paths(spec, where)
    if not spec.include_defaults and not paths:
        raise UserError(f"{where}: lm_eval.include_defaults is false and no include_path is given: no task "
                        "can be found; give include_path or drop include_defaults")
    try:
        tm = task_manager(paths, spec.include_defaults)
    except ImportError:
        raise _lm_eval_missing() from None
    check_task(tm, spec, where)
    try:
        loaded = tm.load([spec.task])
    except (OSError, ValueError, KeyError) as e:  # no network for a hub dataset, missing local files, bad config
        raise UserError(f"{where}: lm-eval cannot load task {spec.task!r} "
                        f"({type(e).__name__}: {(str(e).splitlines() or [''])[0]:.200})") from None
    for name, task in loaded["tasks"].items():
        default = task.get_config("num_fewshot")
        if spec.num_fewshot is None:
            if default is None:
                task.set_config(key="num_fewshot", value=0)
        elif default == 0 and spec.num_fewshot != 0:
            raise UserError(f"{where}: lm-eval task {name!r} fixes num_fewshot: 0 in its config; remove "
                            "lm_eval.num_fewshot or use another task")
        else:
            task.set_config(key="num_fewshot", value=spec.num_fewshot)
    import lm_eval
    data = {"lm_eval": lm_eval.__version__, "tasks": {name: [getattr(t, "VERSION", None), len(t.eval_docs)]
                                                      for name, t in sorted(loaded["tasks"].items())}}
    return LmEvalProbe(spec, data, loaded, where)
