import sys
import types
from importlib.metadata import EntryPoint
from pathlib import Path

import numpy as np
import pytest

from clsuite import registry
from clsuite.errors import UserError
from clsuite.metrics import METRICS, Metric, claim_signs, compute_metrics, register_metric, shown_metrics
from clsuite.registry import Registry
from clsuite.strategy import (KINDS, SINGLE_KINDS, STACKING, STRATEGIES, Conflict, Params, Strategy, _load_builtins,
                              build_strategy, register)


def test_duplicate_names_fail_loudly():
    reg = Registry("thing")
    reg.register("a", 1, aliases=("b",))
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a", 2)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("c", 3, aliases=("b",))


def test_alias_and_suggestion():
    reg = Registry("thing")
    reg.register("replay", 1, aliases=("rehearsal",))
    assert reg.get("rehearsal") == 1
    with pytest.raises(UserError, match="did you mean 'replay'"):
        reg.get("repaly")


def test_type_check():
    with pytest.raises(TypeError):
        STRATEGIES.register("not-a-strategy", object)


def test_register_rejects_bad_kind():
    class Bad(Strategy):
        kind = "magic"
    with pytest.raises(TypeError, match="kind"):
        register("bad-kind")(Bad)


def test_two_update_rules_refused():
    from clsuite.strategy import build_strategy

    class U1(Strategy):
        kind = "update"

    class U2(Strategy):
        kind = "update"
    register("_test_u1")(U1)
    register("_test_u2")(U2)
    try:
        with pytest.raises(UserError, match="update rules"):
            build_strategy("_test_u1+_test_u2")
        with pytest.raises(UserError, match="twice"):
            build_strategy("_test_u1+_test_u1")
    finally:
        STRATEGIES._items.pop("_test_u1")
        STRATEGIES._items.pop("_test_u2")


# --- entry points ------------------------------------------------------------------------------------------------
GROUP = "clsuite.test-group"


def _entry_points(monkeypatch, *pairs: tuple[str, object], group: str = GROUP) -> None:
    """Make ``importlib.metadata.entry_points(group=group)`` yield one entry point per (name, object)."""
    mod = types.ModuleType("_clsuite_test_plugins")
    for i, (_, obj) in enumerate(pairs):
        setattr(mod, f"obj{i}", obj)
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    eps = [EntryPoint(name, f"{mod.__name__}:obj{i}", group) for i, (name, _) in enumerate(pairs)]
    monkeypatch.setattr(registry, "entry_points", lambda group, _wanted=group: eps if group == _wanted else [])


def _builtin() -> int:
    return 1


def _other() -> int:
    return 2


def test_entry_point_under_a_builtin_name_names_both(monkeypatch):
    reg = Registry("thing", GROUP)
    reg.register("a", _builtin)
    _entry_points(monkeypatch, ("a", _other))
    with pytest.raises(UserError) as e:
        reg.names()
    msg = str(e.value)
    assert "'a'" in msg and "_clsuite_test_plugins:obj0" in msg and __name__ in msg  # the plugin and the built-in
    assert "\n" not in msg


def test_two_entry_points_under_one_name_name_both(monkeypatch):
    reg = Registry("thing", GROUP)
    _entry_points(monkeypatch, ("a", _builtin), ("a", _other))
    with pytest.raises(UserError, match=r"_clsuite_test_plugins:obj1 .*already registered by .*_clsuite_test_plugins:obj0"):
        reg.names()


def test_entry_point_to_the_registered_object_is_fine(monkeypatch):
    reg = Registry("thing", GROUP)
    reg.register("a", _builtin, aliases=("b",))  # as a plugin module's decorator does on import
    _entry_points(monkeypatch, ("a", _builtin), ("b", _builtin), ("c", _other))
    assert reg.names() == ["a", "c"] and reg.get("b") is _builtin and reg.get("c") is _other


def test_decorator_clash_inside_a_plugin_names_both():
    reg = Registry("thing")
    reg.register("a", _builtin, origin="the built-ins")
    with pytest.raises(ValueError, match=rf"'a' from {__name__} is already registered by the built-ins"):
        reg.register("a", _other)


def test_entry_point_of_the_wrong_type_is_a_user_error(monkeypatch):
    reg = Registry("metric", GROUP, instance_of=Metric)
    _entry_points(monkeypatch, ("m", _other))
    with pytest.raises(UserError, match="metric plugin 'm' .* must be a Metric"):
        reg.names()


def test_registries_have_their_entry_point_groups():
    from clsuite.models import MODELS
    from clsuite.scoring import SCORERS
    from clsuite.streams import DATA_BUILDERS
    groups = {r.kind: r.group for r in (STRATEGIES, METRICS, SCORERS, DATA_BUILDERS, MODELS)}
    assert groups == {"strategy": "clsuite.strategies", "metric": "clsuite.metrics", "scorer": "clsuite.scorers",
                      "data builder": "clsuite.builders", "model": "clsuite.models"}
    assert "tiny_task" in DATA_BUILDERS and "tiny-synthetic-base" in MODELS  # built-ins load with the first lookup


# --- metrics and scorers -----------------------------------------------------------------------------------------
def test_metrics_carry_shown_and_claim_sign():
    assert shown_metrics() == ["acc", "bwt", "fwt", "forgetting", "plasticity", "probe_retention",
                               "probe_loglik_retention", "probe_fg"]
    assert claim_signs() == {"forgetting": +1, "bwt": -1, "probe_retention": -1, "probe_loglik_retention": -1,
                             "probe_fg": +1}
    m = METRICS.get("forgetting")
    assert (m.name, m.higher_is_better, m.shown, m.claim_sign) == ("forgetting", False, True, 1)
    assert "Chaudhry" in m.formula and m(np.array([[0.0, 0.0], [1.0, 0.0], [0.5, 1.0]]), None) == 0.5
    with pytest.raises(ValueError, match="claim_sign"):
        Metric("x", lambda R, P: 0.0, True, "f", claim_sign=2)
    with pytest.raises(ValueError, match="already registered"):
        register_metric("acc", higher_is_better=True, formula="again")(lambda R, P: 0.0)


def test_a_registered_metric_is_computed_and_listed():
    @register_metric("_test_range", higher_is_better=False, formula="max R - min R", claim_sign=+1)
    def _range(R, P):
        return float(R.max() - R.min())
    try:
        assert compute_metrics([[0.0], [0.5]])["_test_range"] == 0.5
        assert claim_signs()["_test_range"] == 1 and "_test_range" not in shown_metrics()
        assert _range(np.array([[1.0], [3.0]]), None) == 2.0  # the decorated name stays callable
    finally:
        METRICS._items.pop("_test_range")


def test_register_scorer_returns_a_callable_scorer():
    from clsuite.scoring import SCORERS, Scorer, register_scorer

    @register_scorer("_test_len", higher_is_better=False, aliases=("_test_l",))
    def length(model, tok, examples, chat, max_length, batch_size):
        """Mean target length."""
        return {"score": sum(len(e["target"]) for e in examples) / len(examples)}
    try:
        assert isinstance(length, Scorer) and not length.higher_is_better
        assert SCORERS.get("_test_l") is length and SCORERS.aliases_of("_test_len") == ["_test_l"]
        assert length(None, None, [{"target": "ab"}], False, 8, 1) == {"score": 2.0}
    finally:
        SCORERS._items.pop("_test_len")
        SCORERS._aliases.pop("_test_l")


# --- declared conflicts ------------------------------------------------------------------------------------------
def _plugin(**conflict) -> type[Strategy]:
    class P(Strategy):
        kind = "loss"
        description = "test plugin"

        class Params(Params):
            strength: float = 1.0
    P.conflicts = (Conflict(reason="test", **conflict),)
    return P


@pytest.mark.parametrize("conflict, match", [
    ({"other": "lorra"}, "'lorra', which is not a registered strategy: did you mean 'lora'"),
    ({"other": "lora", "when": {"mdoe": "merge"}}, "lora's parameters have no 'mdoe': did you mean 'mode'"),
    ({"other": "lora", "when": {"mode": "merg"}}, "lora's parameter 'mode' does not accept 'merg'"),
    ({"other": "lora", "when": {"r": 0}}, "lora's parameter 'r' does not accept 0"),
    ({"other": "lora", "self_when": {"strenght": 2.0}}, "_test_c's parameters have no 'strenght'"),
])
def test_conflict_with_unknown_names_fails_at_registration(conflict, match):
    _load_builtins()
    with pytest.raises(UserError, match=match):
        register("_test_c")(_plugin(**conflict))
    assert "_test_c" not in STRATEGIES


def test_conflict_of_an_entry_point_plugin_is_checked_when_loaded(monkeypatch):
    _load_builtins()
    monkeypatch.setattr(STRATEGIES, "_state", "new")  # as in a fresh process: built-ins, then entry points
    _entry_points(monkeypatch, ("_test_ep", _plugin(other="lora", when={"rank": 4})), group="clsuite.strategies")
    try:
        with pytest.raises(UserError, match="'_test_ep' .* lora's parameters have no 'rank'"):
            STRATEGIES.names()
    finally:
        STRATEGIES._items.pop("_test_ep", None)


def test_declared_conflict_refuses_the_spec():
    _load_builtins()
    register("_test_c")(_plugin(other="wise-ft", when={"anchor": "previous"}, self_when={"strength": 2.0}))
    try:
        build_strategy("_test_c+wiseft(anchor=previous)")  # its own parameter does not match
        build_strategy("_test_c(strength=2)+wiseft")  # the other's does not
        with pytest.raises(UserError, match=r"_test_c\(strength=2.0\) cannot be combined with "
                                            r"wiseft\(anchor=previous\): test"):
            build_strategy("_test_c(strength=2)+wiseft(anchor=previous)")
    finally:
        STRATEGIES._items.pop("_test_c")


@pytest.mark.parametrize("spec, match", [
    ("ewc+lora(mode=merge)", r"ewc cannot be combined with lora\(mode=merge\): each task trains a fresh adapter"),
    ("lora+wiseft(anchor=previous)", r"wiseft\(anchor=previous\) cannot be combined with lora\(mode=continue\)"),
])
def test_builtin_conflicts_are_declared(spec, match):
    with pytest.raises(UserError, match=match):
        build_strategy(spec)
    assert STRATEGIES.get("ewc").conflicts and STRATEGIES.get("wiseft").conflicts
    build_strategy("ewc+lora")


def test_every_kind_says_how_several_combine():
    assert set(SINGLE_KINDS) | set(STACKING) == set(KINDS) and not set(SINGLE_KINDS) & set(STACKING)
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    rows = {line.split("|")[2].strip(): line for line in readme.splitlines()  # the kinds table: | order | kind |
            if line.startswith("| ") and line.split("|")[1].strip().isdigit()}
    for kind, text in {**STACKING, **SINGLE_KINDS}.items():
        if kind != "base":
            assert text in rows[kind], kind
