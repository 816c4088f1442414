"""Command-line options made from their one declaration: `option()` fields of config dataclasses.

A method's options are the fields of its Config declared with `taps_cl.methods.options.option`;
the training options are TrainConfig's; the run options are those of `RunOptions`. Each becomes a
flag named after its field (`score_lr` → `--score-lr`), with the declared help, range or choices.
Method flags default to None, so that only what the user typed reaches the method (its config
supplies the rest); the others show their defaults.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import click

from taps_cl.errors import TapsError
from taps_cl.methods.base import Method
from taps_cl.methods.catalog import load_builtin
from taps_cl.methods.options import declared_options


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def _value_type(owner: type, field: dataclasses.Field) -> type:
    """int, float or str: the field's annotation without Optional."""
    hint = typing.get_type_hints(owner)[field.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if hint in (int, float, str, bool):
        return hint
    if args and args[0] in (int, float, str):
        return args[0]
    return str  # tuples of names are given as "A,B"


def click_option(owner: type, field: dataclasses.Field, spec: dict[str, Any],
                 show_default: bool) -> Callable[[Any], Any]:
    """The click option of one declared field."""
    if spec["flag"]:
        return click.option(spec["flag"], field.name, flag_value=spec["flag_value"],
                            default=None, help=spec["help"])
    kind = _value_type(owner, field)
    param: Any = kind
    if spec["choices"]:
        param = click.Choice(list(spec["choices"]))
    elif kind in (int, float) and (spec["minimum"] is not None or spec["maximum"] is not None):
        ranged = click.IntRange if kind is int else click.FloatRange
        param = ranged(spec["minimum"], spec["maximum"], min_open=spec["open_minimum"],
                       max_open=spec["open_maximum"])
    if spec.get("method_default"):  # the method may choose: pass nothing unless typed
        return click.option(flag_name(field.name), field.name, type=param, default=None,
                            show_default=spec["method_default"], help=spec["help"])
    default = field.default if show_default and field.default is not None else None
    return click.option(flag_name(field.name), field.name, type=param, default=default,
                        show_default=show_default and default is not None, help=spec["help"])


def apply(options: Iterable[Callable[[Any], Any]]) -> Callable[[Any], Any]:
    """One decorator applying several click options (in the order given, for --help)."""
    options = list(options)

    def decorate(f: Any) -> Any:
        for option in reversed(options):
            f = option(f)
        return f
    return decorate


def config_options(owner: type, *, skip: Iterable[str] = ()) -> Callable[[Any], Any]:
    """Every declared option of dataclass `owner` (TrainConfig, RunOptions), defaults shown."""
    left_out = set(skip)
    return apply(click_option(owner, f, spec, show_default=True)
                 for f, spec in declared_options(owner) if f.name not in left_out)


def _method_declarations(joint: bool) -> Iterator[tuple[str, type, Any, dict[str, Any]]]:
    """(method, its Config, field, declaration) of every declared method option (`joint`: only
    those of methods that can train several tasks together, and that mean something there)."""
    for name, cls in load_builtin().items():
        if joint and cls.plan_group is Method.plan_group:  # cannot train tasks together
            continue
        for f, spec in declared_options(cls.Config):
            if not joint or spec["joint"]:
                yield name, cls.Config, f, spec


def method_owners(joint: bool = False) -> dict[str, list[str]]:
    """Each method option's name → the methods declaring it."""
    owners: dict[str, list[str]] = {}
    for name, _, f, _ in _method_declarations(joint):
        owners.setdefault(f.name, []).append(name)
    return owners


def method_options(joint: bool = False) -> Callable[[Any], Any]:
    """A flag for every declared option of every method (the first declaration's help)."""
    seen: dict[str, Callable[[Any], Any]] = {}
    for _, config, f, spec in _method_declarations(joint):
        seen.setdefault(f.name, click_option(config, f, spec, show_default=False))
    return apply(seen.values())


def chosen_options(method: str, given: dict[str, Any], joint: bool = False) -> dict[str, Any]:
    """The method options the user typed (popped from `given`); a typed option that `method` does
    not have is refused, naming the methods it belongs to."""
    owners = method_owners(joint)
    typed = {k: given.pop(k) for k in list(given) if k in owners}
    typed = {k: v for k, v in typed.items() if v is not None}
    for key in typed:
        if method in load_builtin() and method not in owners[key]:
            raise TapsError(f"{flag_name(key)} applies to --method {', '.join(owners[key])}, "
                            f"not {method}")
    return typed
