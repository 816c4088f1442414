"""Counts a machine cannot hold are refused before anything is recorded or trained.

Every count option has a documented maximum in its declaration (the command line refuses a larger
value as a usage error, exit 2) and in its config's `__post_init__` (the Python API refuses it
with a MethodError). A batch of `batch_size` images at the input size must fit MAX_BATCH_FLOATS,
and in-memory data resized to it MAX_IN_MEMORY_BYTES. Also: a NaN join threshold and an empty
group name are refused, and `group train` needs two tasks.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from taps_cl.data import specs
from taps_cl.errors import DataError, MethodError, TapsError
from taps_cl.manager import Manager
from taps_cl.methods.catalog import get_method
from taps_cl.methods.options import declared_options
from taps_cl.methods.progressive.method import MAX_REDUCTION, ProgressiveConfig
from taps_cl.tasks.requests import (
    MAX_BATCH_FLOATS,
    MAX_IMAGES,
    MAX_IMG_SIZE,
    MAX_RECHECK,
    RunOptions,
    TaskRequest,
    check_input_batch,
    split_options,
)
from taps_cl.training.fit import MAX_BATCH_SIZE, MAX_EPOCHS, MAX_SEED, TrainConfig
from tests.test_bad_input import (  # noqa: F401  (base_home_template, home: fixtures)
    MODEL,
    assert_refused,
    base_home_template,
    home,
    run_cli,
    snapshot,
    task_names,
)

HUGE = str(10**30)
ADD = ("task", "add", "t", "--base", "b", "--data", "digits", "--epochs", "1")
TRAIN = ("group", "train", "--base", "b", "--task", "x=digits", "--task", "y=digits",
         "--epochs", "1")




# ------------------------------------------------------------------ the declared maxima


def test_every_count_option_declares_the_documented_maximum():
    declared = {f.name: spec for cls in (TrainConfig, RunOptions, ProgressiveConfig)
                for f, spec in declared_options(cls)}
    assert {name: declared[name]["maximum"] for name in (
        "epochs", "batch_size", "seed", "img_size", "max_train", "max_test", "recheck",
        "reduction")} == {
        "epochs": MAX_EPOCHS, "batch_size": MAX_BATCH_SIZE, "seed": MAX_SEED,
        "img_size": MAX_IMG_SIZE, "max_train": MAX_IMAGES, "max_test": MAX_IMAGES,
        "recheck": MAX_RECHECK, "reduction": MAX_REDUCTION}
    assert (MAX_EPOCHS, MAX_BATCH_SIZE, MAX_IMG_SIZE, MAX_RECHECK) == (
        100_000, 4096, 4096, 1_000_000)
    assert MAX_BATCH_FLOATS == 2**30  # 4 GiB of float32 input per step


@pytest.mark.parametrize(("field", "maximum"), [
    ("epochs", MAX_EPOCHS), ("batch_size", MAX_BATCH_SIZE), ("seed", MAX_SEED)])
def test_train_config_takes_its_maximum_and_refuses_one_more(field, maximum):
    assert getattr(TrainConfig(**{field: maximum}), field) == maximum
    with pytest.raises(MethodError, match=rf"train: {field} must be <= {maximum}, got"):
        TrainConfig(**{field: maximum + 1})
    with pytest.raises(MethodError, match=rf"{field} must be <= {maximum}"):
        TrainConfig(**{field: 10**30})


def test_a_negative_seed_is_refused_by_the_config():
    with pytest.raises(MethodError, match="train: seed must be >= 0, got -1"):
        TrainConfig(seed=-1)


@pytest.mark.parametrize(("field", "maximum"), [
    ("img_size", MAX_IMG_SIZE), ("max_train", MAX_IMAGES), ("max_test", MAX_IMAGES),
    ("recheck", MAX_RECHECK)])
def test_run_options_take_their_maximum_and_refuse_one_more(field, maximum):
    assert getattr(RunOptions(**{field: maximum}), field) == maximum
    with pytest.raises(MethodError, match=rf"run: {field} must be <= {maximum}, got"):
        RunOptions(**{field: maximum + 1})
    with pytest.raises(MethodError, match=rf"run: {field} must be <= {maximum}"):
        TaskRequest(name="t", base="b", data_spec="digits", **{field: 10**30})


@pytest.mark.parametrize(("field", "value", "message"), [
    ("img_size", 7, "img_size must be >= 8"),
    ("img_size", 32.0, "img_size must be an integer"),
    ("max_train", 0, "max_train must be >= 1"),
    ("recheck", -1, "recheck must be >= 0"),
    ("val_fraction", float("nan"), "val_fraction must be a finite number"),
    ("val_fraction", 1.0, "val_fraction must be > 0 and < 1"),
])
def test_run_options_refuse_what_their_declarations_refuse(field, value, message):
    with pytest.raises(MethodError, match=message):
        RunOptions(**{field: value})


def test_progressive_reduction_is_bounded():
    assert ProgressiveConfig(reduction=MAX_REDUCTION).reduction == MAX_REDUCTION
    with pytest.raises(MethodError, match=rf"progressive: reduction must be <= {MAX_REDUCTION}"):
        get_method("progressive", reduction=10**30)


def test_one_batch_of_input_must_fit():
    check_input_batch(32, 3344)  # 32·3·3344² = 1.07e9 floats ≤ 2^30
    check_input_batch(21, 4096)
    with pytest.raises(MethodError, match=r"a batch of 32 images at 3345 px is 4\.0 GiB"):
        check_input_batch(32, 3345)
    with pytest.raises(MethodError, match=r"a batch of 22 images at 4096 px is 4\.1 GiB of input "
                                          r"\(at most 4 GiB\)"):
        check_input_batch(22, 4096)
    with pytest.raises(MethodError, match="a batch of 32 images at 4096 px"):
        split_options({"img_size": 4096}, TaskRequest, "taps")
    train, run, _ = split_options({"img_size": 4096, "batch_size": 21}, TaskRequest, "taps")
    assert (train.batch_size, run) == (21, {"img_size": 4096})


# ------------------------------------------------------------------ in-memory data


def test_in_memory_data_too_large_at_its_size_is_refused_before_resizing(monkeypatch):
    def no_resize(self, images):  # must not be reached
        raise AssertionError("resized although refused")

    monkeypatch.setattr(specs.Preprocess, "resize", no_resize)
    cfg = {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3}
    # digits: 1797 images of one channel; at 4096 px 1797·4096² bytes = 28.1 GiB.
    with pytest.raises(DataError, match=r"digits: 1797 images at 4096 px would take 28\.1 GiB "
                                        r"in memory \(at most 8 GiB\)"):
        specs.load_task_data("digits", cfg, img_size=4096)
    # Fewer images fit: 10 + 1·10 (val keeps a class each) + 10 at 4096 px is 0.5 GiB.
    monkeypatch.setattr(specs, "MAX_IN_MEMORY_BYTES", 30 * 4096 * 4096)
    with pytest.raises(AssertionError, match="resized although refused"):
        specs.load_task_data("digits", cfg, img_size=4096, max_train=10, max_test=10)


def test_resizing_in_bounded_chunks_changes_no_pixel(monkeypatch):
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (37, 1, 8, 8),
                                                                dtype=np.uint8))
    pre = specs.Preprocess(24, "bicubic", [0.5] * 3, [0.5] * 3)
    whole = pre.resize(images)
    sizes = []
    real = specs.F.interpolate

    def spy(x, *args, **kwargs):
        sizes.append(x.shape[0])
        return real(x, *args, **kwargs)

    monkeypatch.setattr(specs.F, "interpolate", spy)
    monkeypatch.setattr(specs, "_RESIZE_FLOATS", 5 * 24 * 24)  # 5 images a chunk
    chunked = pre.resize(images)
    assert sizes == [5] * 7 + [2]
    assert torch.equal(chunked, whole)


# ------------------------------------------------------------------ the command line


@pytest.mark.parametrize(("option", "value", "maximum"), [
    ("--epochs", HUGE, MAX_EPOCHS),
    ("--epochs", str(MAX_EPOCHS + 1), MAX_EPOCHS),
    ("--batch-size", str(MAX_BATCH_SIZE + 1), MAX_BATCH_SIZE),
    ("--img-size", "100000", MAX_IMG_SIZE),
    ("--max-train", HUGE, MAX_IMAGES),
    ("--max-test", HUGE, MAX_IMAGES),
    ("--recheck", HUGE, MAX_RECHECK),
    ("--seed", HUGE, MAX_SEED),
])
@pytest.mark.parametrize("command", [ADD, TRAIN], ids=["task-add", "group-train"])
def test_counts_past_their_maximum_are_usage_errors(home, command, option, value, maximum):
    assert_refused(home, *command, option, value,
                   pattern=rf"Invalid value for '{option}'.*<={maximum}")
    assert task_names(home) == []


@pytest.mark.parametrize("command", [ADD, TRAIN], ids=["task-add", "group-train"])
def test_a_batch_too_large_at_the_image_size_is_refused(home, command):
    result = assert_refused(home, *command, "--img-size", "4096",
                            pattern=r"a batch of 32 images at 4096 px is 6\.0 GiB of input")
    assert result.code == 1
    assert task_names(home) == []


def test_data_too_large_at_the_image_size_is_refused(home):
    result = assert_refused(home, *ADD, "--img-size", "4096", "--batch-size", "8",
                            pattern=r"1797 images at 4096 px would take 28\.1 GiB in memory")
    assert result.code == 1


def test_a_huge_progressive_reduction_is_refused(home):
    # A method option: refused by the click range of its first declaration or by the config.
    assert_refused(home, *ADD, "--method", "progressive", "--reduction", HUGE,
                   pattern=r"reduction")
    assert task_names(home) == []


def test_a_nan_join_threshold_is_refused(home):
    result = assert_refused(home, *ADD, "--method", "progressive", "--join-threshold", "nan",
                            pattern=r"progressive: join_threshold must be a finite number")
    assert result.code == 1


@pytest.mark.parametrize("group", ["", "  "])
def test_an_empty_group_name_is_refused(home, group):
    result = assert_refused(home, *ADD, "--method", "progressive", "--group", group,
                            pattern=r"progressive: group must be auto, new or a group's name")
    assert result.code == 1


def test_group_train_refuses_a_single_task(home):
    result = assert_refused(home, "group", "train", "--base", "b", "--task", "x=digits",
                            "--epochs", "1",
                            pattern=r"^Error: group train needs at least two tasks; use task "
                                    r"add for one$")
    assert result.code == 1


# ------------------------------------------------------------------ the Python API


@pytest.mark.parametrize(("options", "message"), [
    ({"epochs": 10**30}, "epochs must be <= 100000"),
    ({"batch_size": 10**6}, "batch_size must be <= 4096"),
    ({"img_size": 100000}, "img_size must be <= 4096"),
    ({"img_size": 4096}, "a batch of 32 images at 4096 px"),
    ({"img_size": 4096, "batch_size": 8}, "1797 images at 4096 px would take"),
    ({"max_train": 10**30}, "max_train must be <= 1000000000"),
    ({"max_test": 10**30}, "max_test must be <= 1000000000"),
    ({"recheck": 10**30}, "recheck must be <= 1000000"),
    ({"seed": 2**64}, "seed must be <= 4294967295"),
    ({"method": "progressive", "reduction": 10**30}, "reduction must be <= 65536"),
    ({"method": "progressive", "join_threshold": float("nan")},
     "join_threshold must be a finite number"),
    ({"method": "progressive", "group": ""}, "group must be auto, new or a group's name"),
])
def test_the_python_api_refuses_them_leaving_no_row(home, options, message):
    before = snapshot(home)
    with Manager(home) as m, pytest.raises(TapsError, match=message):
        m.add_task("t", "b", "digits", **options)
    assert snapshot(home) == before


@pytest.mark.parametrize(("tasks", "options", "message"), [
    ([("x", "digits")], {}, "group train needs at least two tasks; use task add for one"),
    ([("x", "digits"), ("y", "digits")], {"epochs": 10**30}, "epochs must be <= 100000"),
    ([("x", "digits"), ("y", "digits")], {"img_size": 4096},
     "a batch of 32 images at 4096 px"),
    ([("x", "digits"), ("y", "digits")], {"recheck": 10**30}, "recheck must be <= 1000000"),
])
def test_group_train_refuses_them_leaving_no_row(home, tasks, options, message):
    before = snapshot(home)
    with Manager(home) as m, pytest.raises(TapsError, match=message):
        m.group_train("b", tasks, **options)
    assert snapshot(home) == before


def test_the_default_group_is_auto_and_stored_names_still_load():
    assert ProgressiveConfig().group == "auto"
    assert get_method("progressive", group="pa").config.group == "pa"
