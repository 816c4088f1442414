"""Validators of method and training options: one message format for every bad value."""

from __future__ import annotations

import math
from typing import Any

from taps_cl.errors import MethodError


def check_number(
    method: str,
    field: str,
    value: Any,
    *,
    minimum: float | None = None,
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
    return int(value) if integer else float(value)


def check_choice(method: str, field: str, value: Any, choices: tuple[str, ...]) -> str:
    """Validate one config field that must be one of `choices`; raise MethodError."""
    if value not in choices:
        raise MethodError(
            f"{method}: {field} must be one of {', '.join(choices)}, got {value!r}"
        )
    return value
