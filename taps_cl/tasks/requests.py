"""What `task add` and `group train` are asked, and how keyword options are sorted out.

A keyword option is a training option (TrainConfig), a run option (`RunOptions`: data sizes,
validation share, re-checks) or an option of the method (its Config): each is declared once, as a
dataclass field, and `split_options` sorts a caller's keywords by those declarations.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

from taps_cl.errors import MethodError
from taps_cl.methods.base import Method
from taps_cl.methods.catalog import get_method
from taps_cl.methods.options import check_number, declared_options, option
from taps_cl.training.fit import TrainConfig

RECHECK_SAMPLE = 8  # earlier tasks whose probes an add re-checks (a bounded, seeded sample)

# Upper bounds of the run's counts (see training/fit.py for the training ones). A larger value
# cannot be meant and would fail only after the task's row was recorded, out of memory.
# Input size: 4096 px is 16× a 256-px backbone's input; one such image is 3·4096² floats (200 MB).
MAX_IMG_SIZE = 4096
# One training step's input, batch_size·3·size² floats, is at most 2^30 floats (4 GiB; the
# evaluation batch is twice as large): e.g. batch 32 up to 3344 px, 4096 px up to batch 21.
MAX_BATCH_FLOATS = 2**30
# Images a subsample may ask for: beyond any data set that fits a machine (ImageNet-21k holds
# 14 million); a larger cap means "all of them" anyway.
MAX_IMAGES = 1_000_000_000
# Earlier tasks an add re-checks: each is a model rebuilt from its files, about a second; a
# million is days of checking (and more tasks than a registry has: `report accuracy --verify`
# checks every one).
MAX_RECHECK = 1_000_000


def check_input_batch(batch_size: int, img_size: int) -> None:
    """MethodError unless one step's input, batch_size images of 3×img_size² floats, fits in
    MAX_BATCH_FLOATS."""
    floats = batch_size * 3 * img_size * img_size
    if floats > MAX_BATCH_FLOATS:
        raise MethodError(
            f"a batch of {batch_size} images at {img_size} px is {floats * 4 / 2**30:.1f} GiB of "
            f"input (at most {MAX_BATCH_FLOATS * 4 // 2**30} GiB): use a smaller --batch-size "
            "or --img-size")


@dataclass(frozen=True)
class RunOptions:
    """What a run reads of its data and re-checks; shared by `task add` and `group train`."""

    # Input size (default: the base's).
    img_size: Optional[int] = option(None, "Input size (default: the base's).", minimum=8,
                                     maximum=MAX_IMG_SIZE)
    # Subsample each training set / test set to this many images (class-stratified).
    max_train: Optional[int] = option(None, "Subsample each training set.", minimum=1,
                                      maximum=MAX_IMAGES)
    max_test: Optional[int] = option(None, "Subsample each test set.", minimum=1,
                                     maximum=MAX_IMAGES)
    # Share of the training data held out for validation (model selection), where the data
    # brings no validation split of its own.
    val_fraction: float = option(0.1, "Share of the training data held out for validation.",
                                 minimum=0, maximum=1, open_minimum=True, open_maximum=True)
    # Earlier tasks whose probes the add re-checks (a seeded sample; 0: none). Whatever the
    # number, the add cannot change them; `report accuracy --verify` checks them all.
    recheck: int = option(RECHECK_SAMPLE, "Earlier tasks whose probes are re-checked (default 8: "
                          "the latest, any it reads, a seeded sample of the rest; `report "
                          "accuracy --verify` checks all).", minimum=0, maximum=MAX_RECHECK)

    def __post_init__(self) -> None:
        """The declared bounds, for callers of the Python API (the command line checks them
        before the request is built)."""
        def fix(name: str, value: object) -> None:
            object.__setattr__(self, name, value)

        bounds = {f.name: spec for f, spec in declared_options(RunOptions)}
        for name in ("img_size", "max_train", "max_test", "recheck"):  # counts; None: not given
            value, spec = getattr(self, name), bounds[name]
            if value is not None:
                fix(name, check_number("run", name, value, minimum=spec["minimum"],
                                       maximum=spec["maximum"], integer=True))
        fraction = check_number("run", "val_fraction", self.val_fraction)
        if not 0 < fraction < 1:
            raise MethodError(f"run: val_fraction must be > 0 and < 1, got {fraction!r}")
        fix("val_fraction", fraction)


# What `task add` trains when no method is named: adapters (bottlenecks after every block, the
# base's norm statistics, clipped gradients) are the most accurate setting per stored number on
# the benchmark (docs/results.md, "The default: adapters").
DEFAULT_METHOD = "adapter"


@dataclass(frozen=True, kw_only=True)
class TaskRequest(RunOptions):
    """Everything `task add` was asked, checked before anything is recorded."""

    name: str
    base: str
    data_spec: str
    method: str = DEFAULT_METHOD
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


def split_options(options: dict[str, Any], request: type, method: str,
                  method_options: Optional[dict[str, Any]] = None
                  ) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """(TrainConfig, run options of `request`, the method's options) out of keyword options; a
    training option not given takes `method`'s own default for its options (`method_options` and
    those among the keywords) where it has one (`Method.train_defaults`: e.g. lr 1e-2 for compact
    TAPS, gradient clipping for adapters), else TrainConfig's."""
    train_keys = {f.name for f in dataclasses.fields(TrainConfig)}
    # The request's own fields that a caller passes by keyword (run options, class subset).
    run_keys = {f.name for f in dataclasses.fields(request)} - set(_GIVEN_EXPLICITLY)
    train = {k: v for k, v in options.items() if k in train_keys and v is not None}
    run = {k: v for k, v in options.items() if k in run_keys and v is not None}
    own = {k: v for k, v in options.items() if k not in train_keys and k not in run_keys}
    defaults = get_method(method, **{**(method_options or {}), **own}).train_defaults()
    train = {**{k: v for k, v in defaults.items() if k in train_keys}, **train}
    train_cfg = TrainConfig(**train)
    checked = RunOptions(**{k: v for k, v in run.items()
                            if k in {f.name for f in dataclasses.fields(RunOptions)}})
    if checked.img_size is not None:  # the base's own size is checked once the base is known
        check_input_batch(train_cfg.batch_size, checked.img_size)
    return train_cfg, run, own


def configured_method(method: str, options: dict[str, Any], epochs: int) -> Method:
    """The method `method` with the user's `options`, fitted to a run of `epochs` epochs."""
    return get_method(method, **options).for_epochs(epochs, set(options))
