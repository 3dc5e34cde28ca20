"""Strategy plugins: the base class, its hooks, the registry, and composition of specs like ``sam+ewc``.

Hooks use Avalanche's vocabulary. Every plugin has one *kind*; the engine calls hooks in the fixed
order of ``KINDS`` (parametrization, weights, data, loss, gradient, update) so that, after an experience, an
adapter is merged before Wise-FT interpolates, and EWC anchors the weights that Wise-FT produced.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Callable, ClassVar, Literal, Mapping

import pydantic
from pydantic import BaseModel, ConfigDict

from .errors import UserError, did_you_mean
from .registry import Registry
from .spec import parse_spec

if TYPE_CHECKING:
    import torch

    from .engine import Context

Kind = Literal["base", "parametrization", "weights", "data", "loss", "gradient", "update"]
KINDS: tuple[Kind, ...] = ("base", "parametrization", "weights", "data", "loss", "gradient", "update")
SINGLE_KINDS = {"update": "two update rules cannot both own the optimizer step",
                "parametrization": "two parametrizations cannot both wrap the model"}
# How several plugins of one of the other kinds combine (within a kind the engine keeps their spec order).
STACKING: dict[Kind, str] = {
    "base": "add nothing: dropped beside other kinds; of several alone, the first is kept",
    "weights": "each rewrites the weights the previous one left, in spec order",
    "data": "each sees the data and examples the previous one returned, in spec order",
    "loss": "their terms add",
    "gradient": "each changes the gradient the previous one left, in spec order",
}


@dataclass(frozen=True)
class Conflict:
    """This plugin cannot run beside strategy ``other`` when ``other``'s parameters equal ``when`` and its own
    equal ``self_when`` (empty: always). Names and values are checked against the registry on first use."""

    other: str
    reason: str
    when: Mapping[str, Any] = field(default_factory=dict)
    self_when: Mapping[str, Any] = field(default_factory=dict)

    def describe(self, name: str) -> str:
        """The refused pair, e.g. ``wiseft(anchor=previous) + lora(mode=continue)`` for the plugin ``name``."""
        return f"{name}{_show(self.self_when)} + {self.other}{_show(self.when)}"


class Params(BaseModel):
    """Base for strategy parameters: unknown keys are errors; ``lambda`` may stand for ``lam``."""
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True, allow_inf_nan=False)


class Strategy:
    """A continual-learning plugin. Subclasses set ``kind``, ``description`` and ``Params``; all hooks are optional."""

    name: ClassVar[str] = ""
    kind: ClassVar[Kind] = "base"
    description: ClassVar[str] = ""
    Params: ClassVar[type[Params]] = Params
    # Combinations this plugin refuses; checked against the registry (names, parameters, values) on first use.
    conflicts: ClassVar[tuple[Conflict, ...]] = ()

    def __init__(self, params: Params | None = None):
        self.params = params if params is not None else self.Params()

    # --- hooks, called by the engine -------------------------------------------------------------
    def before_training(self, ctx: Context) -> None:
        """Once, before the first experience (after row 0 of R is evaluated)."""

    def before_training_exp(self, ctx: Context) -> None:
        """Before each experience; a parametrization may (re)wrap ``ctx.model`` here."""

    def train_dataset_adaptation(self, ctx: Context, dataset: Any) -> Any:
        """Return the training data of this experience (a data plugin may extend it)."""
        return dataset

    def before_training_iteration(self, ctx: Context, examples: list[dict]) -> list[dict]:
        """Return the examples of one optimizer step (a data plugin may mix in others)."""
        return examples

    def before_backward(self, ctx: Context) -> torch.Tensor | None:
        """Return a term to add to the objective, or None. Called at every pass, SAM's second included."""
        return None

    def before_update(self, ctx: Context) -> None:
        """Change the gradient in ``.grad`` (in place) just before the base optimizer steps: ``ctx.base_step()``
        calls it after every pass the update rule needs (with SAM: the gradient at w + e), before clipping."""

    def optimizer_step(self, ctx: Context, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Update rules only: compute gradients via ``closure`` (the full objective), then ``ctx.base_step()``."""
        raise NotImplementedError

    def after_training_exp(self, ctx: Context) -> None:
        """After each experience, before it is evaluated (merge adapters, interpolate weights, store Fisher)."""

    def after_training(self, ctx: Context) -> None:
        """Once, after the last experience."""

    # --- cost and state ----------------------------------------------------------------------------
    def extra_memory_bytes(self) -> int:
        """Bytes this plugin holds beyond the model and optimizer (Fisher, anchors, buffers)."""
        return 0

    def cost_report(self) -> dict[str, float]:
        """Cost figures beyond passes and memory for the record's ``cost`` (e.g. the share of SAM steps)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Its state between experiences, for checkpoints: tensors and JSON values (tuples come back as lists)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a ``state_dict()``; on resume it runs after ``before_training``, whose effects it must override."""

    def conflict(self, others: list["Strategy"]) -> str | None:
        """Why this plugin cannot run beside ``others`` (checked at parse time), or None. Declare ``conflicts``;
        override this only for a condition they cannot state, and call ``super().conflict``."""
        for c in self.conflicts:
            if not _params_match(self.params, c.self_when):
                continue
            other = STRATEGIES.get(c.other).name
            for o in others:
                if o.name == other and _params_match(o.params, c.when):
                    return (f"{self.name}{_show(c.self_when)} cannot be combined with {other}{_show(c.when)}: "
                            f"{c.reason}")
        return None

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.model_dump(by_alias=True).items())
        return f"{self.name}({args})"


class _StrategyRegistry(Registry):
    """Every entry gets a name and a checked kind, also a bare class that only an entry point names; ``conflicts``
    are checked once all built-ins and entry points are in, and for a later registration at once."""

    def register(self, name: str, obj: type[Strategy], aliases: tuple[str, ...] = (),
                 origin: str | None = None) -> type[Strategy]:
        if isinstance(obj, type) and issubclass(obj, Strategy):
            if obj.kind not in KINDS:
                raise TypeError(f"strategy {name!r} has kind {obj.kind!r}; use one of {KINDS}")
            if not vars(obj).get("name"):  # not set by @register or by the class itself
                obj.name = name
            if self._state == "loaded":
                check_conflicts(obj)
        return super().register(name, obj, aliases, origin)

    def _loaded(self) -> None:
        for _, cls in self.items():
            check_conflicts(cls)


STRATEGIES: Registry[type[Strategy]] = _StrategyRegistry("strategy", "clsuite.strategies", base=Strategy,
                                                         builtins="clsuite.strategies")


def check_conflicts(cls: type[Strategy]) -> None:
    """Raise UserError unless every ``Conflict`` of ``cls`` names a registered strategy and, on both sides,
    parameters of its Params with values they accept: a renamed parameter cannot switch a check off silently."""
    for c in cls.conflicts:
        where = f"strategy {cls.name!r} ({cls.__module__}) declares a conflict with {c.other!r}"
        if c.other not in STRATEGIES:
            known = STRATEGIES.names()
            raise UserError(f"{where}, which is not a registered strategy: {did_you_mean(c.other, known)}"
                            f"known: {', '.join(known)}; fix its conflicts")
        for side, when in ((STRATEGIES.get(c.other), c.when), (cls, c.self_when)):
            for key, value in when.items():
                problem = _param_problem(side.Params, key, value)
                if problem:
                    raise UserError(f"{where}: {side.name}'s {problem}; fix its conflicts")


def _param_problem(params: type[Params], key: str, value: Any) -> str | None:
    """Why ``key=value`` is not a parameter setting of ``params``, or None."""
    fields = params.model_fields
    name = key if key in fields else next((k for k, f in fields.items() if f.alias == key), None)
    if name is None:
        known = sorted({*fields, *(f.alias for f in fields.values() if f.alias)})
        return f"parameters have no {key!r}: {did_you_mean(key, known)}known: {', '.join(known) or 'none'}"
    f = fields[name]
    kind = Annotated[(f.annotation, *f.metadata)] if f.metadata else f.annotation  # the type with its constraints
    try:
        pydantic.TypeAdapter(kind).validate_python(value)
    except pydantic.ValidationError as e:
        return f"parameter {key!r} does not accept {value!r}: {e.errors()[0]['msg']}"
    return None


def _params_match(params: Params, when: Mapping[str, Any]) -> bool:
    fields = type(params).model_fields
    names = {f.alias: k for k, f in fields.items() if f.alias}
    return all(getattr(params, names.get(k, k)) == v for k, v in when.items())


def _show(when: Mapping[str, Any]) -> str:
    return f"({', '.join(f'{k}={_value(v)}' for k, v in when.items())})" if when else ""


def register(name: str, aliases: tuple[str, ...] = ()) -> Callable[[type[Strategy]], type[Strategy]]:
    """Class decorator: ``@register("ewc")`` adds a Strategy subclass to the registry."""

    def wrap(cls: type[Strategy]) -> type[Strategy]:
        cls.name = name
        return STRATEGIES.register(name, cls, aliases)

    return wrap


def _load_builtins() -> None:
    STRATEGIES.names()  # imports the built-ins and the entry points


def build_strategy(spec: str) -> list[Strategy]:
    """Parse and validate one composed spec; return its plugins sorted by kind."""
    _load_builtins()
    plugins: list[Strategy] = []
    for name, raw in parse_spec(spec):
        cls = STRATEGIES.get(name)
        try:
            params = cls.Params(**raw)
        except pydantic.ValidationError as e:
            errs = "; ".join(f"{'.'.join(map(str, x['loc'])) or 'params'}: {x['msg']}" for x in e.errors())
            fields = ", ".join(f"{k}={f.default!r}" for k, f in cls.Params.model_fields.items()) or "none"
            raise UserError(f"strategy {name!r}: {errs} (parameters: {fields})") from None
        plugins.append(cls(params))
    names = [p.name for p in plugins]
    for n in set(names):
        if names.count(n) > 1:
            raise UserError(f"strategy spec {spec!r} names {n!r} twice: give it once")
    for kind, reason in SINGLE_KINDS.items():
        same = [p.name for p in plugins if p.kind == kind]
        if len(same) > 1:
            raise UserError(f"strategy spec {spec!r} combines {' and '.join(same)}: {reason}; keep one")
    for p in plugins:
        reason = p.conflict([o for o in plugins if o is not p])
        if reason:
            raise UserError(f"strategy spec {spec!r}: {reason}")
    plugins = [p for p in plugins if p.kind != "base"] or plugins[:1]
    return sorted(plugins, key=lambda p: KINDS.index(p.kind))


def canonical_spec(spec: str) -> str:
    """A stable display name for a spec: plugins in kind order, only non-default parameters shown."""
    parts = []
    for p in build_strategy(spec):
        defaults = p.Params().model_dump(by_alias=True) if _all_defaulted(p.Params) else {}
        args = {k: v for k, v in p.params.model_dump(by_alias=True).items() if defaults.get(k, object()) != v}
        parts.append(p.name + (f"({', '.join(f'{k}={_value(v)}' for k, v in args.items())})" if args else ""))
    return "+".join(parts)


_BARE = re.compile(r"[A-Za-z_][\w.\-]*")  # a name token of clsuite.spec, read back as a string


def _value(v: Any, top: bool = True) -> str:
    """A parameter value as parse_spec reads it back (the form of ``str(v)`` wherever that one round-trips)."""
    if isinstance(v, list):
        return "[" + ", ".join(_value(x, False) for x in v) + "]"
    if isinstance(v, str) and not (top and _BARE.fullmatch(v) and v.lower() not in ("true", "false", "none", "null")):
        return f"'{v}'" if "'" not in v else f'"{v}"'  # parse_spec never yields a string with both quotes
    return str(v)


def _all_defaulted(cls: type[Params]) -> bool:
    return all(not f.is_required() for f in cls.model_fields.values())
