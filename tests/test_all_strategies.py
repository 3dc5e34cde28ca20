"""Generated from the registry (timm-style): every strategy, and sam+ it, runs end to end on the tiny stream.

A newly registered strategy is covered here without new test code.
"""
import pytest

from clsuite.errors import UserError
from clsuite.records import read_record
from clsuite.runner import resolve_config, run_one
from clsuite.strategy import STRATEGIES, _load_builtins, build_strategy

_load_builtins()
NAMES = STRATEGIES.names()
KIND = {n: STRATEGIES.get(n).kind for n in NAMES}
SPECS = NAMES + [f"sam+{n}" for n in NAMES if KIND[n] not in ("update", "base")]


def test_registry_has_the_builtins():
    assert {"naive", "sam", "asam", "ewc", "replay", "wiseft", "lora"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_strategy_declares_itself(name):
    cls = STRATEGIES.get(name)
    assert cls.description and cls.kind in ("base", "parametrization", "weights", "data", "loss", "update")
    cls.Params()  # every parameter has a default


@pytest.mark.parametrize("spec", SPECS)
def test_runs_end_to_end(spec, tiny_stream, tmp_path):
    cfg = resolve_config(tiny_stream, spec, 0)
    rec = read_record(run_one(tiny_stream, cfg, tmp_path, progress=False))
    assert rec.status == "complete"
    assert len(rec.R) == len(tiny_stream.tasks) + 1
    assert all(v is not None for k, v in rec.metrics.items() if not k.startswith("probe"))
    assert rec.cost["compute_multiplier"] >= 1.0
    assert rec.cost["extra_memory_bytes"] >= 0
    if spec.startswith("sam"):
        assert rec.cost["compute_multiplier"] >= 2.0  # two forward/backward passes per step


@pytest.mark.parametrize("name", [n for n in NAMES if KIND[n] == "update" and n != "sam"])
def test_second_update_rule_is_refused(name):
    with pytest.raises(UserError, match="update rules"):
        build_strategy(f"sam+{name}")
