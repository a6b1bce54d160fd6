"""One registry mechanism for everything softprune builds by name: criteria, schedules, presets,
budgets, plugins (regularizers, ...), methods and models.

A registry maps names to builders (classes or functions). ``register`` refuses a name that is taken
(pass ``replace=True`` to override on purpose); ``build`` makes an object from a name, from a mapping
``{"kind": name, **options}`` (the form YAML configs use) or passes an already built one through;
an unknown name or option is a :class:`~softprune.errors.SoftpruneError` that lists the choices.
``temporarily`` registers for the length of a ``with`` block (tests, notebooks).

Why not a plain dict: five hand-written parsers had five sets of errors, and a dict silently lets a
second registration replace the first.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Generic, TypeVar

from .errors import SoftpruneError, choice_error

T = TypeVar("T")


class Registry(Mapping[str, T], Generic[T]):
    """Named builders of one kind (``kind`` names it in messages: "criterion", "plugin", ...).

    ``instance_of``: objects of this type are already built and pass through ``build`` unchanged.
    """

    def __init__(self, kind: str, instance_of: type | tuple[type, ...] | None = None) -> None:
        self.kind = kind
        self.instance_of = instance_of
        self._items: dict[str, T] = {}

    # -- Mapping: name -> builder ----------------------------------------------------------------
    def __getitem__(self, name: str) -> T:
        try:
            return self._items[name]
        except (KeyError, TypeError):
            raise choice_error(self.kind, name, self._items) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._items

    def get(self, name: str, default: Any = None) -> Any:
        return self._items.get(name, default) if isinstance(name, str) else default

    def names(self) -> list[str]:
        return sorted(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._items)})"

    # -- registering ------------------------------------------------------------------------------
    def register(self, name: str | None = None, builder: T | None = None, *, replace: bool = False) -> Any:
        """``register("name", builder)``, or as a decorator: ``@register("name")`` or ``@register()``
        (the builder's ``name`` attribute, else its ``__name__``)."""

        def add(obj: T) -> T:
            key = name or getattr(obj, "name", None) or getattr(obj, "__name__", None)
            if not isinstance(key, str) or not key:
                raise SoftpruneError(f"a {self.kind} needs a name to be registered under")
            if key in self._items and not replace and self._items[key] is not obj:
                raise SoftpruneError(
                    f"a {self.kind} named {key!r} is already registered; choose another name "
                    "(or pass replace=True to override it on purpose)"
                )
            self._items[key] = obj
            return obj

        return add if builder is None else add(builder)

    def unregister(self, name: str) -> T:
        if name not in self._items:
            raise choice_error(self.kind, name, self._items)
        return self._items.pop(name)

    @contextmanager
    def temporarily(self, name: str, builder: T, *, replace: bool = False) -> Iterator[T]:
        """Register ``builder`` for the length of the block, then restore what was there."""
        before = self._items.get(name)
        self.register(name, builder, replace=replace)
        try:
            yield builder
        finally:
            if before is None:
                self._items.pop(name, None)
            else:
                self._items[name] = before

    # -- building ---------------------------------------------------------------------------------
    def build(self, spec: Any, **options: Any) -> Any:
        """An object from a name (with ``options``), a mapping ``{"kind": name, **options}``, or an
        object already built (returned as it is)."""
        if self.instance_of is not None and isinstance(spec, self.instance_of):
            if options:
                raise SoftpruneError(f"options {sorted(options)} were given with a {self.kind} already built")
            return spec
        if isinstance(spec, Mapping):
            options = {**dict(spec), **options}
            spec = options.pop("kind", None)
            if spec is None:
                raise SoftpruneError(
                    f"a {self.kind} given as a mapping needs 'kind' (one of: {', '.join(self.names())})"
                )
        if not isinstance(spec, str):
            raise SoftpruneError(
                f"a {self.kind} is a name ({', '.join(self.names())}) or a mapping with 'kind', got {spec!r}"
            )
        builder = self[spec]
        return call_with_options(builder, options, f"{self.kind} {spec!r}")


def call_with_options(builder: Callable[..., T], options: dict[str, Any], what: str) -> T:
    """``builder(**options)``, where an option it does not take is a SoftpruneError naming it and
    the options it does take (a TypeError from inside the builder is not hidden)."""
    try:
        signature = inspect.signature(builder)
    except (TypeError, ValueError):  # a builtin without a signature: let the call speak
        return builder(**options)
    params = signature.parameters.values()
    if not any(p.kind is p.VAR_KEYWORD for p in params):
        allowed = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise SoftpruneError(
                f"{what} has no option {unknown[0]!r}; its options are: {', '.join(allowed) or 'none'}"
            )
    missing = [
        p.name
        for p in params
        if p.default is p.empty
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and p.name not in options
    ]
    if missing:
        raise SoftpruneError(f"{what} needs the option {missing[0]!r}")
    return builder(**options)
