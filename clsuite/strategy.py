"""Strategy plugins: the base class, its hooks, the registry, and composition of specs like ``sam+ewc``.

Hooks use Avalanche's vocabulary. Every plugin has one *kind*; the engine calls hooks in the fixed
order of ``KINDS`` (parametrization, weights, data, loss, update) so that, after an experience, an
adapter is merged before Wise-FT interpolates, and EWC anchors the weights that Wise-FT produced.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Literal

import pydantic
from pydantic import BaseModel, ConfigDict

from .errors import UserError
from .registry import Registry
from .spec import parse_spec

if TYPE_CHECKING:
    import torch

    from .engine import Context

Kind = Literal["base", "parametrization", "weights", "data", "loss", "update"]
KINDS: tuple[Kind, ...] = ("base", "parametrization", "weights", "data", "loss", "update")
SINGLE_KINDS = {"update": "two update rules cannot both own the optimizer step",
                "parametrization": "two parametrizations cannot both wrap the model"}


class Params(BaseModel):
    """Base for strategy parameters: unknown keys are errors; ``lambda`` may stand for ``lam``."""
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True, allow_inf_nan=False)


class Strategy:
    """A continual-learning plugin. Subclasses set ``kind``, ``description`` and ``Params``; all hooks are optional."""

    name: ClassVar[str] = ""
    kind: ClassVar[Kind] = "base"
    description: ClassVar[str] = ""
    Params: ClassVar[type[Params]] = Params
    # Names of strategies this one cannot be combined with, mapped to the reason.
    incompatible: ClassVar[dict[str, str]] = {}

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

    def state_dict(self) -> dict[str, Any]:
        """Its state between experiences, for checkpoints: tensors and JSON values (tuples come back as lists)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a ``state_dict()``; on resume it runs after ``before_training``, whose effects it must override."""

    def conflict(self, others: list["Strategy"]) -> str | None:
        """Why this plugin cannot run beside ``others`` (checked at parse time), or None."""
        for o in others:
            if o.name in self.incompatible:
                return f"{self.name} cannot be combined with {o.name}: {self.incompatible[o.name]}"
        return None

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.model_dump(by_alias=True).items())
        return f"{self.name}({args})"


class _StrategyRegistry(Registry):
    """Every entry gets a name and a checked kind, also a bare class that only an entry point names."""


    def register(self, name: str, obj: type[Strategy], aliases: tuple[str, ...] = ()) -> type[Strategy]:
        if isinstance(obj, type) and issubclass(obj, Strategy):
            if obj.kind not in KINDS:
                raise TypeError(f"strategy {name!r} has kind {obj.kind!r}; use one of {KINDS}")
            if not vars(obj).get("name"):  # not set by @register or by the class itself
                obj.name = name
        return super().register(name, obj, aliases)


STRATEGIES: Registry[type[Strategy]] = _StrategyRegistry("strategy", "clsuite.strategies", base=Strategy)


def register(name: str, aliases: tuple[str, ...] = ()) -> Callable[[type[Strategy]], type[Strategy]]:
    """Class decorator: ``@register("ewc")`` adds a Strategy subclass to the registry."""

    def wrap(cls: type[Strategy]) -> type[Strategy]:
        cls.name = name
        return STRATEGIES.register(name, cls, aliases)

    return wrap


def _load_builtins() -> None:
    from . import strategies  # noqa: F401  (registers the built-ins)


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
