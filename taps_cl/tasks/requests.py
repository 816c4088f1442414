"""What `task add` and `group train` are asked, and how keyword options are sorted out.

A keyword option is a training option (TrainConfig), a run option (`RunOptions`: data sizes,
validation share, re-checks) or an option of the method (its Config): each is declared once, as a
dataclass field, and `split_options` sorts a caller's keywords by those declarations.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from taps_cl.methods.base import Method
from taps_cl.methods.catalog import get_method
from taps_cl.methods.options import option
from taps_cl.training.fit import TrainConfig

RECHECK_SAMPLE = 8  # earlier tasks whose probes an add re-checks (a bounded, seeded sample)


@dataclass(frozen=True)
class RunOptions:
    """What a run reads of its data and re-checks; shared by `task add` and `group train`."""

    # Input size (default: the base's).
    img_size: Optional[int] = option(None, "Input size (default: the base's).", minimum=8)
    # Subsample each training set / test set to this many images (class-stratified).
    max_train: Optional[int] = option(None, "Subsample each training set.", minimum=1)
    max_test: Optional[int] = option(None, "Subsample each test set.", minimum=1)
    # Share of the training data held out for validation (model selection), where the data
    # brings no validation split of its own.
    val_fraction: float = option(0.1, "Share of the training data held out for validation.",
                                 minimum=0, maximum=1, open_minimum=True, open_maximum=True)
    # Earlier tasks whose probes the add re-checks (a seeded sample; 0: none). Whatever the
    # number, the add cannot change them; `report accuracy --verify` checks them all.
    recheck: int = option(RECHECK_SAMPLE, "Earlier tasks whose probes are re-checked (default 8: "
                          "the latest, any it reads, a seeded sample of the rest; `report "
                          "accuracy --verify` checks all).", minimum=0)


@dataclass(frozen=True, kw_only=True)
class TaskRequest(RunOptions):
    """Everything `task add` was asked, checked before anything is recorded."""

    name: str
    base: str
    data_spec: str
    method: str = "taps"
    # Class subset of the data, e.g. "0,1,2" or class names.
    classes: Optional[str] = None
    method_options: Optional[dict[str, Any]] = None


@dataclass(frozen=True, kw_only=True)
class GroupRequest(RunOptions):
    """What `group train` was asked: new tasks (name, data spec) on one base."""

    base: str
    tasks: tuple[tuple[str, str], ...]  # (name, data spec) of each new task
    # The method that trains them together (one that implements `Method.plan_group`).
    method: str = "progressive"
    groups: Optional[int] = None  # number of similarity groups (None: automatic)
    method_options: Optional[dict[str, Any]] = None  # the method's options


# Request fields add_task/group_train take as their own parameters, not as options.
_GIVEN_EXPLICITLY = ("name", "base", "data_spec", "method", "method_options", "tasks", "groups")


def split_options(options: dict[str, Any], request: type) -> tuple[Any, dict[str, Any],
                                                                 dict[str, Any]]:
    """(TrainConfig, run options of `request`, the method's options) out of keyword options."""
    train_keys = {f.name for f in dataclasses.fields(TrainConfig)}
    # The request's own fields that a caller passes by keyword (run options, class subset).
    run_keys = {f.name for f in dataclasses.fields(request)} - set(_GIVEN_EXPLICITLY)
    train = {k: v for k, v in options.items() if k in train_keys and v is not None}
    run = {k: v for k, v in options.items() if k in run_keys and v is not None}
    own = {k: v for k, v in options.items() if k not in train_keys and k not in run_keys}
    return TrainConfig(**train), run, own


def configured_method(method: str, options: dict[str, Any], epochs: int) -> Method:
    """The method `method` with the user's `options`, fitted to a run of `epochs` epochs."""
    return get_method(method, **options).for_epochs(epochs, set(options))
