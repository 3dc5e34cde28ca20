"""A small named registry with aliases, duplicate checks, entry points and did-you-mean suggestions."""
from __future__ import annotations

import difflib
from importlib.metadata import entry_points
from typing import Callable, Generic, TypeVar

from .errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names (and aliases) to objects of one kind; third-party entries come from an entry-point group."""

    def __init__(self, kind: str, entry_point_group: str | None = None, base: type | None = None):
        self.kind, self.group, self.base = kind, entry_point_group, base
        self._items: dict[str, T] = {}
        self._aliases: dict[str, str] = {}
        self._entry_points_loaded = entry_point_group is None

    def register(self, name: str, obj: T, aliases: tuple[str, ...] = ()) -> T:
        if self.base is not None and not (isinstance(obj, type) and issubclass(obj, self.base)):
            raise TypeError(f"{self.kind} {name!r} must be a subclass of {self.base.__name__}, got {obj!r}")
        for key in (name, *aliases):
            if key in self._items or key in self._aliases:
                raise ValueError(f"{self.kind} {key!r} is already registered; choose another name")
        self._items[name] = obj
        for alias in aliases:
            self._aliases[alias] = name
        return obj

    def decorator(self, name: str, aliases: tuple[str, ...] = ()) -> Callable[[T], T]:
        return lambda obj: self.register(name, obj, aliases)

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        for ep in entry_points(group=self.group):
            if ep.name in self._items:
                continue  # the module was already imported and registered itself
            where = f"{ep.value} (package {ep.dist.name if ep.dist else '?'})"
            try:
                obj = ep.load()  # importing registers it when the target uses the decorator
                if ep.name not in self._items and ep.name not in self._aliases:
                    self.register(ep.name, obj)
            except (ImportError, AttributeError, TypeError, ValueError) as e:
                raise UserError(f"{self.kind} plugin {ep.name!r} from {where} cannot be loaded: {e}; "
                                "fix or uninstall that package") from None

    def names(self) -> list[str]:
        self._load_entry_points()
        return sorted(self._items)

    def items(self) -> list[tuple[str, T]]:
        return [(n, self._items[n]) for n in self.names()]

    def __contains__(self, name: str) -> bool:
        self._load_entry_points()
        return name in self._items or name in self._aliases

    def get(self, name: str) -> T:
        self._load_entry_points()
        name = self._aliases.get(name, name)
        if name not in self._items:
            close = difflib.get_close_matches(name, list(self._items) + list(self._aliases), n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise UserError(f"unknown {self.kind} {name!r}: {hint}known: {', '.join(self.names())}")
        return self._items[name]
