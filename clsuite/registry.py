"""A small named registry with aliases, duplicate checks, entry points and did-you-mean suggestions."""
from __future__ import annotations

import importlib
from importlib.metadata import EntryPoint, entry_points
from typing import Callable, Generic, TypeVar

from .errors import UserError, did_you_mean

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names (and aliases) to objects of one kind. The first lookup imports the ``builtins`` module, then the
    entry-point group; a name taken by two different objects is an error naming both. ``sort=False``: ``names()``
    in registration order."""

    def __init__(self, kind: str, entry_point_group: str | None = None, base: type | None = None,
                 instance_of: type | None = None, builtins: str | None = None, sort: bool = True):
        self.kind, self.group, self.base, self.instance_of = kind, entry_point_group, base, instance_of
        self.builtins, self.sort = builtins, sort
        self._items: dict[str, T] = {}
        self._aliases: dict[str, str] = {}
        self._origins: dict[str, str] = {}  # name -> where it was registered from (module or entry point)
        self._state = "new"  # "new" -> "loading" (built-ins, entry points) -> "loaded"

    def register(self, name: str, obj: T, aliases: tuple[str, ...] = (), origin: str | None = None) -> T:
        """Add ``obj`` under ``name`` and ``aliases``; ``origin`` (default: its module) names it in clash errors."""
        if self.base is not None and not (isinstance(obj, type) and issubclass(obj, self.base)):
            raise TypeError(f"{self.kind} {name!r} must be a subclass of {self.base.__name__}, got {obj!r}")
        if self.instance_of is not None and not isinstance(obj, self.instance_of):
            raise TypeError(f"{self.kind} {name!r} must be a {self.instance_of.__name__}, got {obj!r}")
        origin = origin or getattr(obj, "__module__", None) or "?"
        for key in (name, *aliases):
            if key in self._items or key in self._aliases:
                raise ValueError(f"{self.kind} {key!r} from {origin} is already registered by "
                                 f"{self._origin(key)}; choose another name")
        self._items[name] = obj
        self._origins[name] = origin
        for alias in aliases:
            self._aliases[alias] = name
        return obj

    def decorator(self, name: str, aliases: tuple[str, ...] = ()) -> Callable[[T], T]:
        return lambda obj: self.register(name, obj, aliases)

    def _origin(self, key: str) -> str:
        return self._origins.get(self._aliases.get(key, key), "?")

    def _load(self) -> None:
        """Import the built-ins, then the entry points, once; a failure leaves the registry to retry (and fail again)."""
        if self._state != "new":
            return
        self._state = "loading"
        try:
            if self.builtins:
                importlib.import_module(self.builtins)
            for ep in entry_points(group=self.group) if self.group else ():
                self._add_entry_point(ep)
            self._state = "loaded"
            self._loaded()
        except BaseException:
            self._state = "new"
            raise

    def _loaded(self) -> None:
        """Called once every built-in and entry point is registered (subclasses check cross-references here)."""

    def _add_entry_point(self, ep: EntryPoint) -> None:
        where = f"entry point {ep.name} = {ep.value} (package {ep.dist.name if ep.dist else '?'})"
        try:
            obj = ep.load()  # importing registers it when the target uses the decorator
            key = self._aliases.get(ep.name, ep.name)
            if key not in self._items:
                self.register(ep.name, obj, origin=where)
                return
        except (ImportError, AttributeError, TypeError, ValueError) as e:
            raise UserError(f"{self.kind} plugin {ep.name!r} from {where} cannot be loaded: {e}; "
                            "fix or uninstall that package") from None
        if self._items[key] is not obj:  # the same object: its module registered itself on import
            raise UserError(f"{self.kind} {ep.name!r} from {where} is already registered by {self._origin(key)}: "
                            "rename one of them or uninstall one of the packages")

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items) if self.sort else list(self._items)

    def items(self) -> list[tuple[str, T]]:
        return [(n, self._items[n]) for n in self.names()]

    def aliases_of(self, name: str) -> list[str]:
        """The aliases registered for ``name``."""
        self._load()
        return [a for a, n in self._aliases.items() if n == name]

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._items or name in self._aliases

    def get(self, name: str) -> T:
        self._load()
        name = self._aliases.get(name, name)
        if name not in self._items:
            hint = did_you_mean(name, [*self._items, *self._aliases])
            raise UserError(f"unknown {self.kind} {name!r}: {hint}known: {', '.join(self.names())}")
        return self._items[name]
