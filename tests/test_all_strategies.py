"""Generated from the registry (timm-style): every strategy, and every pair of strategies, either runs one step end
to end on the tiny stream or is refused by build_strategy for a reason the strategies declare (two update rules,
two parametrizations, a declared Conflict). A newly registered strategy is covered here without new test code."""
from itertools import combinations

import pytest

from clsuite.config import resolve_config
from clsuite.errors import UserError
from clsuite.records import read_record
from clsuite.runner import run_one
from clsuite.strategy import KINDS, SINGLE_KINDS, STRATEGIES, Conflict, build_strategy

NAMES = STRATEGIES.names()
PAIRS = [f"{a}+{b}" for a, b in combinations(NAMES, 2)]
SMOKE = {"train": {"steps": 1}, "eval": {"max_examples": 2}}  # one step per experience, two rows per eval set
# every declared conflict, spelled with the parameters it names on both sides: (strategy, Conflict)
CONFLICTS = [(n, c) for n in NAMES for c in STRATEGIES.get(n).conflicts]


def test_registry_has_the_builtins():
    assert {"naive", "sam", "asam", "ewc", "replay", "wiseft", "lora"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_strategy_declares_itself(name):
    cls = STRATEGIES.get(name)
    assert cls.description and cls.kind in KINDS
    cls.Params()  # every parameter has a default


def _settings(params) -> dict:
    """A Params instance as {field name and alias: value}."""
    return {**params.model_dump(), **params.model_dump(by_alias=True)}


def _matches(params, when) -> bool:
    have = _settings(params)
    return all(have[k] == v for k, v in when.items())


def declared_refusal(spec: str) -> str | None:
    """Why the declarations refuse ``a+b`` at default parameters (None: it must run), read from the classes alone."""
    a, b = (STRATEGIES.get(n) for n in spec.split("+"))
    if a.kind == b.kind and a.kind in SINGLE_KINDS:
        return SINGLE_KINDS[a.kind]
    for x, y in ((a, b), (b, a)):
        for c in x.conflicts:
            if STRATEGIES.get(c.other) is y and _matches(x.Params(), c.self_when) and _matches(y.Params(), c.when):
                return c.reason
    return None


def _spelled(name: str, when: dict) -> str:
    return name + (f"({', '.join(f'{k}={v}' for k, v in when.items())})" if when else "")


@pytest.mark.parametrize("spec", NAMES + [pytest.param(s, marks=pytest.mark.slow) for s in PAIRS])
def test_runs_one_step_or_is_refused_for_a_declared_reason(spec, tiny_stream, tmp_path):
    reason = declared_refusal(spec) if "+" in spec else None
    if reason is not None:
        with pytest.raises(UserError) as e:
            build_strategy(spec)
        assert reason in str(e.value) and "\n" not in str(e.value)
        return
    cfg = resolve_config(tiny_stream, spec, 0, **SMOKE)
    rec = read_record(run_one(tiny_stream, cfg, tmp_path, progress=False))
    assert rec.status == "complete"
    assert len(rec.R) == len(tiny_stream.tasks) + 1 and [e["steps"] for e in rec.experiences] == [1, 1]
    assert all(v is not None for k, v in rec.metrics.items() if not k.startswith("probe"))
    assert rec.cost["compute_multiplier"] >= 1.0
    assert rec.cost["extra_memory_bytes"] >= 0
    if any(isinstance(p, STRATEGIES.get("sam")) for p in build_strategy(spec)):
        assert rec.cost["compute_multiplier"] >= 2.0  # two forward/backward passes per step


@pytest.mark.parametrize("name, conflict", CONFLICTS, ids=[f"{n}-{c.other}" for n, c in CONFLICTS])
def test_declared_conflict_is_refused_in_either_order(name: str, conflict: Conflict):
    mine, other = _spelled(name, conflict.self_when), _spelled(conflict.other, conflict.when)
    for spec in (f"{mine}+{other}", f"{other}+{mine}"):
        with pytest.raises(UserError, match="cannot be combined") as e:
            build_strategy(spec)
        assert conflict.reason in str(e.value)
