"""User-facing errors and the helpers that word them: the CLI prints them on one line and exits with code 2."""
from __future__ import annotations

import difflib
from typing import Any, Iterable, get_args


class UserError(Exception):
    """Bad input from the user: the message names the problem and the fix."""


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss; the run is recorded as failed."""


def did_you_mean(name: str, known: Iterable[str], n: int = 1) -> str:
    """``"did you mean 'x'? "`` for the closest of ``known`` to ``name``, or ``""`` when none is close."""
    close = difflib.get_close_matches(str(name), [str(k) for k in known], n=n)
    if not close:
        return ""
    return f"did you mean {close[0]!r}? " if n == 1 else f"did you mean {' or '.join(map(repr, close))}? "


def error_location(loc: tuple) -> str:
    """A pydantic error location on one line: keys with newlines or other unprintables are quoted."""
    return ".".join(str(k) if str(k).isprintable() else repr(k) for k in loc)


def pydantic_message(e: Any, model: Any = None, default: str = "value", first_only: bool = False) -> str:
    """A ``pydantic.ValidationError`` as ``loc: msg; loc: msg`` on one line; given the ``model`` class that raised
    it, an unknown key gets the closest known key suggested and a missing one its field's description."""
    errors = e.errors()[:1] if first_only else e.errors()
    parts = []
    for x in errors:
        loc, kind = error_location(x["loc"]) or default, x.get("type")
        if kind == "extra_forbidden" and x["loc"] and model is not None:
            known = _fields_at(model, x["loc"][:-1])
            hint = did_you_mean(str(x["loc"][-1]), known)
            parts.append(f"{loc}: unknown key; {hint}known: {', '.join(known) or 'none'}")
        elif kind == "missing":
            field = getattr(_model_at(model, x["loc"][:-1]), "model_fields", {}).get(x["loc"][-1] if x["loc"] else "")
            parts.append(f"missing '{loc}:'" + (f" ({field.description})" if field and field.description else ""))
        elif kind in ("model_type", "model_attributes_type", "dict_type"):
            parts.append(f"{repr(loc + ':') if x['loc'] else loc} must be a mapping{_got(x)}")
        elif kind == "value_error" and "error" in x.get("ctx", {}):
            parts.append(f"{loc}: {x['ctx']['error']}")  # the validator's own words, without "Value error, "
        else:
            parts.append(f"{loc}: {x['msg']}{_got(x)}")
    return "; ".join(parts)


def _got(error: dict) -> str:
    """``", got int 3"`` for the input that failed (containers by type only)."""
    if "input" not in error:
        return ""
    value = error["input"]
    if isinstance(value, (str, int, float, type(None))):
        return f", got {type(value).__name__} {value!r:.60}"
    return f", got {type(value).__name__}"


def _fields_at(cls: Any, path: tuple) -> list[str]:
    """Field names (and aliases) of the pydantic model found by following ``path`` (field names, list indices,
    dict keys) from ``cls``; [] where the path leaves the models."""
    cls = _model_at(cls, path)
    if not hasattr(cls, "model_fields"):
        return []
    by_name = cls.model_config.get("populate_by_name", False)  # else a field with an alias is given by its alias
    return sorted({name for k, f in cls.model_fields.items() for name in ([k] if by_name or not f.alias else [])
                   + ([f.alias] if f.alias else [])})


def _model_at(cls: Any, path: tuple) -> Any:
    """The pydantic model class reached by following ``path`` from ``cls``, or None where the path leaves them."""
    for key in path:
        if isinstance(key, int) or not hasattr(cls, "model_fields"):
            continue
        field = cls.model_fields.get(str(key)) or next(
            (f for f in cls.model_fields.values() if f.alias == key), None)
        if field is None:
            continue  # a dict key (e.g. a strategy's name): the value's model follows
        cls = _model_in(field.annotation)
        if cls is None:
            return None
    return cls


def _model_in(annotation: Any) -> Any:
    """The first pydantic model class inside a type annotation (``list[Task]``, ``Task | None``, ``dict[str, X]``)."""
    if hasattr(annotation, "model_fields"):
        return annotation
    for arg in get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None
