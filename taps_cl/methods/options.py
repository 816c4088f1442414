"""Options declared once: `option()` fields of config dataclasses, and their validators.

A config field declared with `option(default, help, ...)` is a user option: the command line makes
a flag of it (`--score-lr` for `score_lr`, with this help and range), the Python API takes it as a
keyword, and the dataclass's `__post_init__` validates it (`check_number`, `check_choice`: one
message format for every bad value). Fields declared without it are internal (set by the code).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from taps_cl.errors import MethodError


def check_number(
    method: str,
    field: str,
    value: Any,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    positive: bool = False,
    integer: bool = False,
) -> float | int:
    """Validate one numeric config field and return it as float (or int); raise MethodError.

    Float fields must be finite: an inf or NaN learning rate or λ passes every range check
    (`inf > 0`, NaN compares false) and would only fail once training has started.
    """
    # bool is an int subclass, but `lam=True` is certainly a mistake.
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        wanted = "an integer" if integer else "a number"
        raise MethodError(f"{method}: {field} must be {wanted}, got {value!r}")
    if not integer:
        try:
            finite = math.isfinite(value)
        except OverflowError:  # an int too large for a float
            finite = False
        if not finite:
            raise MethodError(f"{method}: {field} must be a finite number, got {value!r}")
    if positive and not value > 0:
        raise MethodError(f"{method}: {field} must be > 0, got {value!r}")
    if minimum is not None and value < minimum:
        raise MethodError(f"{method}: {field} must be >= {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise MethodError(f"{method}: {field} must be <= {maximum}, got {value!r}")
    return int(value) if integer else float(value)


def check_choice(method: str, field: str, value: Any, choices: tuple[str, ...]) -> str:
    """Validate one config field that must be one of `choices`; raise MethodError."""
    if value not in choices:
        raise MethodError(
            f"{method}: {field} must be one of {', '.join(choices)}, got {value!r}"
        )
    return value


# Metadata key of an option's declaration on a dataclass field.
OPTION = "taps_cl.option"


def option(default: Any, help: str, *, minimum: float | None = None,
           maximum: float | None = None, open_minimum: bool = False, open_maximum: bool = False,
           choices: tuple[str, ...] | None = None, flag: str | None = None,
           flag_value: Any = None, joint: bool = True,
           method_default: str | None = None) -> Any:
    """A dataclass field that is a user option (see the module docstring).

    `minimum`/`maximum` (open or closed) and `choices` bound what the command line accepts before
    the config is built; `flag` with `flag_value` makes a switch (e.g. `--no-own-adapter`);
    `joint=False` marks an option that means nothing when several tasks train together;
    `method_default` (the text --help shows as the default) marks a training option whose default
    the method may set (e.g. `Method.train_defaults`): left out, it is not passed on.
    """
    spec = {"help": help, "minimum": minimum, "maximum": maximum, "open_minimum": open_minimum,
            "open_maximum": open_maximum, "choices": choices, "flag": flag,
            "flag_value": flag_value, "joint": joint, "method_default": method_default}
    return dataclasses.field(default=default, metadata={OPTION: spec})


def declared_options(config: type) -> list[tuple[dataclasses.Field, dict[str, Any]]]:
    """The fields of dataclass `config` declared with `option()`, with their declarations."""
    return [(f, f.metadata[OPTION]) for f in dataclasses.fields(config) if OPTION in f.metadata]
