"""``clsuite tune``: each strategy's setting selected on validation seeds, then run on disjoint test seeds
(docs/protocol.md)."""
from __future__ import annotations

import itertools
import random
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from .atomic import write_text
from .config import EvalConfig, TrainConfig, resolve_config, validated
from .errors import UserError, did_you_mean, pydantic_message
from .records import read_record
from .registry import Registry
from .spec import parse_spec
from .strategy import STRATEGIES, canonical_spec
from .sweep import Cell, cached_stream, check_keys, read_grid_doc, run_tag

EXAMPLE = "see examples/tune-tiny.yaml"
SELECTED = "selected.yaml"
COSTS = "costs.yaml"  # measured seconds per step of the compared strategies


class Rule(BaseModel):
    """How a strategy's setting is chosen from its validation scores (``RULES``)."""
    model_config = ConfigDict(extra="forbid")
    name: StrictStr = "acc"
    fraction: float = Field(0.9, gt=0, le=1, description="retention_at_plasticity: share of the reference's best "
                                                         "validation plasticity a setting must reach")


class TuneGrid(BaseModel):
    """A tuning grid: per-strategy search spaces, tuning and test seeds, a selection rule, the comparisons."""
    model_config = ConfigDict(extra="forbid")
    streams: list[StrictStr] = Field(min_length=1)
    strategies: dict[str, dict[str, list[Any]]] = Field(min_length=1, description="spec -> {knob: [values]}: "
                                                        "training settings (lr, steps, ...) or the strategy's own")
    tuning_seeds: list[StrictInt] = Field(min_length=1)
    test_seeds: list[StrictInt] = []
    primary_seeds: list[StrictInt] = Field([], description="more test seeds for the rows the family compares (its "
                                                           "strategies, their matched and equal-compute rows)")
    budget: StrictInt = Field(8, ge=1, description="settings tried per strategy (a seeded sample of a larger space)")
    rule: Rule = Rule()
    reference: StrictStr = Field("naive", description="the strategy whose selected validation plasticity the "
                                                      "matched comparison aims at")
    matched: bool = True
    equal_compute: bool | list[StrictStr] = Field(False, description="each comparison A - B of the family (true) or "
                                                  "those listed ('A - B') also as A - B at A's measured cost")
    family: list[StrictStr] | None = Field(None, description="paired comparisons 'A - B', declared before the test "
                                                             "runs (default: each X+sam - X, and each strategy - "
                                                             "reference)")
    secondary: list[StrictStr] = Field([], description="more comparisons 'A - B', reported apart with their own "
                                                       "Holm adjustment (exploratory)")
    model: StrictStr | None = None
    set_: dict[str, Any] = Field({}, alias="set", description="training settings fixed for every cell")
    eval: dict[str, Any] = {}
    test_eval: dict[str, Any] = Field({}, description="evaluation settings of the test runs only, over eval (e.g. "
                                      "{sharpness: worst}): what the test runs measure beside, never what is selected")

    @pydantic.model_validator(mode="after")
    def _disjoint_seeds(self) -> "TuneGrid":
        both = sorted(set(self.tuning_seeds) & set(self.test_seeds + self.primary_seeds))
        if both:
            raise ValueError(f"tuning_seeds and test_seeds share {both}: a setting must never be reported on the "
                             "run that selected it; use e.g. tuning_seeds: [100, 101] and test_seeds: [0, 1, 2, 3, 4]")
        return self


@dataclass(frozen=True)
class Setting:
    """One point of a strategy's space: its canonical spec (with its own knobs) and training settings."""
    name: str  # the strategy as the grid names it (canonical)
    spec: str
    train: tuple[tuple[str, Any], ...]

    @property
    def tag(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.train)

    @property
    def label(self) -> str:
        return f"{self.spec} [{self.tag}]" if self.tag else self.spec


def load_tune_grid(path: Path) -> TuneGrid:
    """Read and validate a tuning grid (``include:`` merged) or raise a one-line UserError."""
    doc = read_grid_doc(Path(path), EXAMPLE)
    try:
        grid = TuneGrid.model_validate(doc)
    except pydantic.ValidationError as e:
        raise UserError(f"tuning grid {path}: {pydantic_message(e, TuneGrid)} ({EXAMPLE})") from None
    if grid.rule.name not in RULES:
        raise UserError(f"tuning grid {path}: rule: unknown rule {grid.rule.name!r}: "
                        f"{did_you_mean(grid.rule.name, RULES.names())}known: {', '.join(RULES.names())}")
    check_keys([k for k in grid.set_], TrainConfig, f"tuning grid {path}, set")
    for key in ("eval", "test_eval"):
        check_keys(list(getattr(grid, key)), EvalConfig, f"tuning grid {path}, {key}")
        if "split" in getattr(grid, key):
            raise UserError(f"tuning grid {path}, {key}: split is set by clsuite tune (val to select, test to "
                            "report); remove it")
    validated(EvalConfig, {**grid.eval, **grid.test_eval}, f"tuning grid {path}, test_eval")
    return grid


def _knob(spec: str, key: str, value: Any, terms: list[tuple[str, dict]], where: str) -> None:
    """Put strategy knob ``key`` (``rho``, or ``sam.rho`` in a composition) into the term it belongs to."""
    name, _, field = key.rpartition(".")
    fields = {t: {f.alias or k for k, f in STRATEGIES.get(t).Params.model_fields.items()} | set(
        STRATEGIES.get(t).Params.model_fields) for t, _ in terms}
    owners = [t for t, _ in terms if (not name or t == name) and field in fields[t]]
    if len(owners) != 1:
        known = sorted({f"{t}.{f}" if len(terms) > 1 else f for t, fs in fields.items() for f in fs} |
                       set(TrainConfig.model_fields))
        why = f"{len(owners)} of its strategies take it: write it as strategy.{field}; " if owners else \
            f"neither a training setting nor a parameter of {spec}; {did_you_mean(key, known)}"
        raise UserError(f"{where}: knob {key!r}: {why}known: {', '.join(known)}")
    next(params for t, params in terms if t == owners[0])[field] = value


def space(spec: str, knobs: dict[str, list[Any]], budget: int, where: str) -> list[Setting]:
    """Every setting of a strategy's space, or a seeded sample of ``budget`` of them (in space order)."""
    name = canonical_spec(spec)
    keys = list(knobs)
    combos = list(itertools.product(*knobs.values()))
    if len(combos) > budget:
        keep = sorted(random.Random(f"tune-{name}").sample(range(len(combos)), budget))
        combos = [combos[i] for i in keep]
    out = []
    for values in combos:
        terms = [(t, dict(p)) for t, p in parse_spec(spec)]
        train = {}
        for k, v in zip(keys, values):
            if k in TrainConfig.model_fields:
                train[k] = v
            else:
                _knob(spec, k, v, terms, where)
        if train:  # as validated: a YAML 1e-3 (a string) is the learning rate 0.001
            typed = validated(TrainConfig, {**train, **({"steps": None} if "epochs" in train else {})}, where)
            train = {k: getattr(typed, k) for k in train}
        text = "+".join(t + (f"({', '.join(f'{k}={v!r}' for k, v in p.items())})" if p else "") for t, p in terms)
        out.append(Setting(name, canonical_spec(text.replace("'", '"')), tuple(sorted(train.items()))))
    return out


def spaces(grid: TuneGrid, where: str) -> dict[str, list[Setting]]:
    """Strategy name (canonical) -> its settings."""
    out: dict[str, list[Setting]] = {}
    for spec, knobs in grid.strategies.items():
        name = canonical_spec(spec)
        if name in out:
            raise UserError(f"{where}: strategies {spec!r} and another entry are both {name}: give it once")
        out[name] = space(spec, knobs, grid.budget, f"{where}, strategy {spec}")
    if grid.reference not in out:
        raise UserError(f"{where}: reference: {grid.reference!r} is not tuned here; add it under strategies: or "
                        f"name one of {', '.join(out)}")
    return out


def cells(grid: TuneGrid, ref: str, st: Setting, seeds: list[int], split: str, out: Path) -> list[Cell]:
    """The sweep cells of one setting x ``seeds`` on ``split``, records under ``out``; tagged as a sweep's ``runs:``
    entry with the same settings is, so a test grid written from the selection names the same cells."""
    s = cached_stream(ref)
    train = {**grid.set_, **dict(st.train)}
    return [Cell(ref, cfg, run_tag(cfg.train, sorted(train)) if train else "", str(Path(out).resolve()))
            for cfg in (resolve_config(s, st.spec, seed, grid.model, train, {**grid.eval, "split": split})
                        for seed in seeds)]


# --- selection ---------------------------------------------------------------------------------------------
@dataclass
class Scored:
    """A setting with its validation metrics (means over tuning seeds)."""
    setting: Setting
    val: dict[str, float]
    n: int

    def row(self) -> dict[str, Any]:
        return {"spec": self.setting.spec, "set": dict(self.setting.train), "n": self.n,
                "val": {k: round(v, 4) for k, v in self.val.items()}}


RuleFn = Callable[[list[Scored], list[Scored], Rule], Scored]
RULES: Registry[RuleFn] = Registry("selection rule", "clsuite.rules", sort=False)
SELECTION_METRICS = ("acc", "plasticity", "forgetting", "probe_retention")


def register_rule(name: str) -> Callable[[RuleFn], RuleFn]:
    """Decorator: ``fn(candidates, reference_candidates, rule) -> the chosen candidate``, from validation scores."""
    return lambda fn: RULES.register(name, fn, origin=fn.__module__)


@register_rule("acc")
def _best_acc(cands: list[Scored], reference: list[Scored], rule: Rule) -> Scored:
    """The highest validation ACC over the stream's tasks (probes not read); the first in space order on ties."""
    return max(cands, key=lambda c: c.val["acc"])


@register_rule("retention_at_plasticity")
def _retention_at_plasticity(cands: list[Scored], reference: list[Scored], rule: Rule) -> Scored:
    """The highest validation probe retention of the settings reaching ``fraction`` of the reference's plasticity.

    The reference's plasticity is its best validation plasticity; when no setting reaches the level, the most
    plastic one is chosen."""
    level = rule.fraction * max(c.val["plasticity"] for c in reference)
    ok = [c for c in cands if c.val["plasticity"] >= level and "probe_retention" in c.val]
    return max(ok, key=lambda c: c.val["probe_retention"]) if ok else max(cands, key=lambda c: c.val["plasticity"])


def score(st: Setting, runs: list[Cell]) -> Scored | None:
    """A setting's validation metrics, averaged over its tuning records (``runs``' record paths); None when every
    run diverged (a failed record); a missing record is an error (re-run the tuning sweep)."""
    recs = []
    for c in runs:
        if not c.path.exists():
            raise UserError(f"no validation record of {st.label} seed {c.config.seed} at {c.path}: run the tuning "
                            "sweep (clsuite tune resumes it)")
        recs.append(read_record(c.path))
    recs = [r for r in recs if r.status == "complete"]
    if not recs:
        return None
    val = {m: statistics.fmean(r.metrics[m] for r in recs) for m in SELECTION_METRICS
           if all(r.metrics.get(m) is not None for r in recs)}
    return Scored(st, val, len(recs))


def same_but_lr(settings: list[Setting], chosen: Setting) -> list[Setting]:
    """The settings equal to ``chosen`` in every knob but the learning rate."""
    rest = {k: v for k, v in chosen.train if k != "lr"}
    return [st for st in settings if st.spec == chosen.spec and {k: v for k, v in st.train if k != "lr"} == rest]


def matched(cands: list[Scored], level: float) -> Scored | None:
    """The setting whose validation plasticity is closest to ``level`` from above; None when none reaches it."""
    ok = [c for c in cands if c.val["plasticity"] >= level - 1e-9]
    return min(ok, key=lambda c: c.val["plasticity"]) if ok else None


def default_family(names: list[str], reference: str) -> list[str]:
    """Each X+sam against X (naive for plain sam), then each other strategy against the reference."""
    pairs = []
    for n in names:
        terms = n.split("+")
        if any(t.split("(")[0] == "sam" for t in terms):
            base = "+".join(t for t in terms if t.split("(")[0] != "sam") or reference
            if base in names:
                pairs.append(f"{n} - {base}")
    pairs += [f"{n} - {reference}" for n in names if n != reference and f"{n} - {reference}" not in pairs]
    return pairs


def parse_family(family: list[str], names: list[str], where: str) -> list[tuple[str, str]]:
    """``"A - B"`` entries as (A, B), both tuned strategies (canonical names)."""
    out = []
    for entry in family:
        a, sep, b = entry.partition(" - ")
        if not sep:
            raise UserError(f"{where}: family entry {entry!r}: write it as 'A - B' (spaces around the minus)")
        pair = []
        for x in (a, b):
            try:
                x = canonical_spec(x.strip())
            except UserError as e:
                raise UserError(f"{where}: family entry {entry!r}: {e}") from None
            if x not in names:
                raise UserError(f"{where}: family entry {entry!r}: {x} is not tuned here; "
                                f"{did_you_mean(x, names)}tuned: {', '.join(names)}")
            pair.append(x)
        out.append((pair[0], pair[1]))
    return out


def budget_factor(cost_a: float, cost_b: float) -> float | None:
    """A's measured cost in units of B's, to one decimal; None when A costs under 1.15 B (no budget cell)."""
    return round(cost_a / cost_b, 1) if cost_a / cost_b >= 1.15 - 1e-9 else None


def write_selected(path: Path, doc: dict[str, Any]) -> None:
    header = ("# written by clsuite tune: the rule, the candidates with their validation scores, and the chosen\n"
              "# settings; 'runs' and 'streams' make it a sweep grid's include: (add seeds:) to reproduce the test "
              "runs\n")
    write_text(path, header + yaml.safe_dump(doc, sort_keys=False, allow_unicode=True, width=110))


def _steps(grid: TuneGrid, ref: str, st: Setting) -> dict[str, Any]:
    """The budget key of a setting as resolved: ``{"steps": n}`` or ``{"epochs": e}``."""
    train = resolve_config(cached_stream(ref), st.spec, 0, grid.model, {**grid.set_, **dict(st.train)}).train
    return {"steps": train.steps} if train.epochs is None else {"epochs": train.epochs}


def _scaled(budget: dict[str, Any], k: float) -> dict[str, Any]:
    (key, v), = budget.items()
    return {key: max(1, round(v * k))} if key == "steps" else {key: v * k}


def costs(grid: TuneGrid, ref: str, chosen: dict[str, Scored], names: list[str], path: Path
          ) -> dict[str, dict[str, Any]]:
    """Measured seconds per step of each strategy in ``names`` at its selected setting (``clsuite.cost``), kept in
    ``path`` so that a resumed tune scales the same budgets; measured again only for what the file lacks."""
    from .cost import measure_costs
    kept = yaml.safe_load(path.read_text()) if path.exists() else {}
    want = {n: {"spec": chosen[n].setting.spec, "set": dict(chosen[n].setting.train)} for n in names}
    todo = [n for n in names if (kept.get(n) or {}).get("setting") != want[n]]
    if todo:
        s = cached_stream(ref)
        cfgs = {n: resolve_config(s, want[n]["spec"], grid.tuning_seeds[0], grid.model,
                                  {**grid.set_, **want[n]["set"]}) for n in todo}
        kept.update({n: {"setting": want[n], **c} for n, c in measure_costs(s, cfgs).items()})
        write_text(path, yaml.safe_dump(kept, sort_keys=False))
    return {n: kept[n] for n in names}


def run_tune(path: Path, out: Path, test_seeds: list[int] | None = None,
             run: Callable[[list[Cell]], list[Any]] | None = None) -> dict[str, Path]:
    """Tune every strategy of the grid on validation (tuning seeds), select by the rule, write
    ``out/<stream>/selected.yaml``, then run the chosen settings on the test seeds; returns the selected files."""
    from .sweep import expand, load_grid, run_cells
    run = run or run_cells
    grid = load_tune_grid(path)
    where = f"tuning grid {path}"
    if test_seeds is not None:
        try:
            grid = TuneGrid.model_validate({**grid.model_dump(by_alias=True), "test_seeds": test_seeds})
        except pydantic.ValidationError as e:
            raise UserError(f"--test-seeds: {pydantic_message(e, TuneGrid)}") from None
    val_out, written = Path(out) / "val", {}
    for ref in grid.streams:
        if ref.endswith((".yaml", ".yml")):
            ref = str((Path(path).parent / ref).resolve())
        stream = cached_stream(ref).name
        sp = spaces(grid, where)
        names = list(sp)
        family = parse_family(grid.family or default_family([n for n in names if n != "joint"], grid.reference),
                              names, where)
        secondary = parse_family(grid.secondary, names, where)

        def tuned(keys: list[str]) -> dict[str, list[Scored]]:
            runs = {(k, st): cells(grid, ref, st, grid.tuning_seeds, "val", val_out) for k in keys for st in sp[k]}
            _ran(run([c for cs in runs.values() for c in cs]))
            out_ = {k: [sc for st in sp[k] if (sc := score(st, runs[k, st])) is not None] for k in keys}
            for k, v in out_.items():
                if not v:
                    raise UserError(f"every setting of {k} diverged on validation: widen its space (lower lr)")
            return out_

        scored = tuned(names)
        rule = RULES.get(grid.rule.name)
        chosen = {n: rule(scored[n], scored[grid.reference], grid.rule) for n in scored}
        budgets: dict[str, dict[str, Any]] = {}  # "naive@2.0x" -> {of, factor, for, steps|epochs}
        d = Path(out) / stream
        d.mkdir(parents=True, exist_ok=True)
        cost: dict[str, dict[str, Any]] = {}
        if grid.equal_compute:  # B at A's cost: B's selected setting, its learning rate re-tuned at that budget
            pairs = family if grid.equal_compute is True else parse_family(grid.equal_compute, names, where)
            cost = costs(grid, ref, chosen, sorted({n for pair in pairs for n in pair}), d / COSTS)
            for a, b in pairs:
                k = budget_factor(cost[a]["seconds_per_step"], cost[b]["seconds_per_step"])
                key = f"{b}@{k}x"
                if k is not None and key not in budgets:
                    extra = _scaled(_steps(grid, ref, chosen[b].setting), k)
                    budgets[key] = {"of": b, "factor": k, "for": f"{a} - {b}", **extra}
                    sp[key] = [Setting(key, st.spec, tuple(sorted({**dict(st.train), **extra}.items())))
                               for st in same_but_lr(sp[b], chosen[b].setting)]
            scored.update(tuned(list(budgets)))
            chosen.update({n: rule(scored[n], scored[grid.reference], grid.rule) for n in budgets})
        doc = _selection(grid, ref, stream, scored, chosen, family, budgets, cost, secondary)
        write_selected(d / SELECTED, doc)
        written[stream] = d / SELECTED
        if grid.test_seeds:
            test_grid = d / "test-grid.yaml"
            extra = f"eval: {yaml.safe_dump({**grid.eval, **grid.test_eval}, default_flow_style=True)}" \
                if grid.test_eval else ""
            write_text(test_grid, f"include: {SELECTED}\nseeds: {list(grid.test_seeds)}\n{extra}")
            _ran(run(expand(load_grid(test_grid), test_grid, Path(out) / "test")))
    return written


def _ran(outcomes: list[Any]) -> None:
    """Stop when a cell failed for another reason than diverging (a diverged setting is simply not selectable)."""
    bad = [o for o in outcomes if o.status in ("failed", "not run") and "non-finite" not in o.error]
    if bad:
        raise UserError(f"{len(bad)} cell(s) failed, first {bad[0].label}: {bad[0].error}")


def _selection(grid: TuneGrid, ref: str, stream: str, scored: dict[str, list[Scored]], chosen: dict[str, Scored],
               family: list[tuple[str, str]], budgets: dict[str, dict[str, Any]], cost: dict[str, dict[str, Any]],
               secondary: list[tuple[str, str]] = ()) -> dict[str, Any]:
    """selected.yaml: the sweep grid of the test runs (streams, runs, model, eval) and ``selection``: the rule, the
    candidates with their validation scores, what was chosen and why."""
    level = chosen[grid.reference].val["plasticity"]
    runs: dict[tuple[str, tuple], dict[str, Any]] = {}

    def add(c: Scored, name: str, role: str) -> None:
        entry = runs.setdefault((c.setting.spec, c.setting.train), {
            "strategy": c.setting.spec, "set": {**grid.set_, **dict(c.setting.train)}, "name": name, "roles": []})
        entry["roles"].append(role if entry["name"] == name else f"{role}:{name}")

    per: dict[str, Any] = {}
    for n, cands in scored.items():
        info: dict[str, Any] = {"selected": chosen[n].row()}
        if n in cost:
            info["cost"] = {k: v for k, v in cost[n].items() if k != "setting"}
        add(chosen[n], n, "selected")
        if n in budgets:
            info["budget"] = budgets[n]
        elif grid.matched and n != "joint":  # joint is a reference row
            m = matched(cands, level)
            if m is None:  # matched the other way: its most plastic setting, the reference's closest from above
                m = max(cands, key=lambda c: c.val["plasticity"])
                r = matched(scored[grid.reference], m.val["plasticity"])
                add(r, grid.reference, f"matched@{n}")
                info["matched_reference"] = r.row()
                info["matched_note"] = (f"never reaches the reference's validation plasticity {level:.4f}: compared "
                                        f"at its most plastic setting ({m.val['plasticity']:.4f}) with "
                                        f"{grid.reference} at its setting closest from above "
                                        f"({r.val['plasticity']:.4f})")
            info["matched"] = m.row()
            add(m, n, "matched")
        info["candidates"] = [c.row() for c in cands]
        per[n] = info
    equal = [f"{b['for']} -> {b['for'].split(' - ')[0]} - {k}" for k, b in budgets.items()]
    primary = {n for pair in family for n in pair} | {k for k, b in budgets.items() if tuple(b["for"].split(" - "))
                                                      in family}
    for entry in runs.values():  # a row the family reads: its own name or a role it plays for a primary strategy
        names = {entry["name"]} | {r.partition(":")[2] for r in entry["roles"]} | {
            r.partition("@")[2].partition(":")[0] for r in entry["roles"] if r.startswith("matched@")}
        if grid.primary_seeds and names & primary:
            entry["seeds"] = list(grid.primary_seeds)
    return {"streams": [ref], "model": grid.model, "eval": dict(grid.eval), "runs": list(runs.values()),
            "selection": {"stream": stream, "rule": grid.rule.model_dump(), "reference": grid.reference,
                          "reference_val_plasticity": round(level, 4), "tuning_seeds": list(grid.tuning_seeds),
                          "test_seeds": list(grid.test_seeds), "primary_seeds": list(grid.primary_seeds),
                          "family": [f"{a} - {b}" for a, b in family],
                          "secondary": [f"{a} - {b}" for a, b in secondary],
                          "equal_compute": equal, "strategies": per}}
