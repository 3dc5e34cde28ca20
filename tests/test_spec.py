import pytest

from clsuite.errors import UserError
from clsuite.spec import parse_spec, split_specs
from clsuite.strategy import build_strategy, canonical_spec


def test_parse_composed_spec():
    assert parse_spec("sam(rho=0.05)+ewc(lambda=100)+replay(size=500)") == [
        ("sam", {"rho": 0.05}), ("ewc", {"lambda": 100}), ("replay", {"size": 500})]


def test_parse_values():
    (name, params), = parse_spec("x(a=1e-3, b=true, c='q_proj', d=[q_proj, v_proj], e=-2, f=none, g=word)")
    assert params == {"a": 1e-3, "b": True, "c": "q_proj", "d": ["q_proj", "v_proj"], "e": -2, "f": None, "g": "word"}


def test_split_specs_respects_brackets():
    assert split_specs("naive, sam(rho=0.1,adaptive=true)+ewc, lora(target_modules=[a,b])") == [
        "naive", "sam(rho=0.1,adaptive=true)+ewc", "lora(target_modules=[a,b])"]


@pytest.mark.parametrize("bad", ["", "sam(", "sam(rho)", "sam(rho=)", "sam rho", "sam(rho=1,rho=2)", "+sam",
                                 "sam)+", "sam(rho=__import__('os'))", "a,,b"])
def test_malformed_specs_are_user_errors(bad):
    with pytest.raises(UserError):
        [parse_spec(s) for s in split_specs(bad)]


def test_unknown_strategy_suggests():
    with pytest.raises(UserError, match="did you mean 'naive'"):
        build_strategy("naiv")


def test_naive_canonical():
    assert canonical_spec("naive") == "naive"
    assert canonical_spec("finetune") == "naive"
