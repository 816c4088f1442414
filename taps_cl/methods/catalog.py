"""The catalog of methods by name: `register` a Method class, `get_method("taps", lam=0.3)`.

Importing a method's module registers it. The built-in methods are imported on the first lookup
(`BUILTIN`), so that reading commands need not import every method; a method of your own is
registered by importing its module before the lookup.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, TypeVar

from taps_cl.errors import MethodError
from taps_cl.methods.base import Method

# Modules of the methods that ship with taps-cl; each registers its Method class when imported.
BUILTIN = (
    "taps_cl.methods.taps",
    "taps_cl.methods.lora",
    "taps_cl.methods.finetune",
    "taps_cl.methods.linear",
    "taps_cl.methods.adapter",
    "taps_cl.methods.fusion",
    "taps_cl.methods.progressive.method",
)

METHODS: dict[str, type[Method]] = {}


M = TypeVar("M", bound=type[Method])


def register(cls: M) -> M:
    """Class decorator adding a Method subclass to `METHODS` under its `name`."""
    if cls.name in METHODS and METHODS[cls.name] is not cls:
        raise ValueError(f"method name {cls.name!r} is registered twice")
    METHODS[cls.name] = cls
    return cls


def load_builtin() -> dict[str, type[Method]]:
    """Every registered method by name, the built-in ones imported first."""
    for module in BUILTIN:
        importlib.import_module(module)
    return METHODS


def get_method(name: str, **overrides: Any) -> Method:
    """Build the method `name` with config fields overridden by keyword; None values are ignored."""
    cls = load_builtin().get(name)
    if cls is None:
        raise MethodError(f"unknown method {name!r} (choose from {', '.join(sorted(METHODS))})")
    allowed = [f.name for f in dataclasses.fields(cls.Config)]
    given = {k: v for k, v in overrides.items() if v is not None}
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        options = ", ".join(allowed) if allowed else "none"
        raise MethodError(
            f"method {name!r} has no option {', '.join(map(repr, unknown))} (options: {options})"
        )
    return cls(cls.Config(**given))


def stored_method(name: str, config: dict[str, Any]) -> Method:
    """The method a stored task (or exported model) was trained with: its recorded `config`, and
    for an option the record lacks, the default of the record's time (`Method.LEGACY_DEFAULTS`)
    rather than today's — a TAPS task recorded before compact mode has full deltas."""
    cls = load_builtin().get(name)
    legacy = {} if cls is None else cls.LEGACY_DEFAULTS
    return get_method(name, **{**{k: v for k, v in legacy.items() if k not in config}, **config})
