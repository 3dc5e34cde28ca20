import pytest

from clsuite.errors import UserError
from clsuite.registry import Registry
from clsuite.strategy import STRATEGIES, Strategy, register


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
