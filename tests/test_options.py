"""Options are declared once: a config field declared with `option()` is a command-line flag of
`task add` (and of `group train` for methods that train together) and a keyword of the Python API."""

from __future__ import annotations

import re

import pytest
from click.testing import CliRunner

from taps_cl.cli.app import cli
from taps_cl.cli.options import flag_name
from taps_cl.errors import MethodError
from taps_cl.methods.base import Method
from taps_cl.methods.catalog import load_builtin
from taps_cl.methods.options import declared_options
from taps_cl.tasks.requests import RunOptions, TaskRequest, split_options
from taps_cl.training.fit import TrainConfig
from tests.test_cli import assert_one_line_error, run


def help_of(*command: str) -> str:
    result = CliRunner().invoke(cli, [*command, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    return result.output


def flags(text: str) -> set[str]:
    return set(re.findall(r"(--[a-z][a-z0-9-]+)", text))


def test_every_declared_option_is_a_task_add_flag_with_its_help():
    text = help_of("task", "add")
    shown = flags(text)
    declared = [(f, spec) for cls in load_builtin().values()
                for f, spec in declared_options(cls.Config)]
    declared += declared_options(TrainConfig) + declared_options(RunOptions)
    assert declared
    for field, spec in declared:
        flag = spec["flag"] or flag_name(field.name)
        assert flag in shown, flag
        assert spec["help"].split()[0] in text


def test_group_train_offers_only_the_options_of_methods_that_train_together():
    shown = flags(help_of("group", "train"))
    joint = {name: cls for name, cls in load_builtin().items()
             if cls.plan_group is not Method.plan_group}
    assert joint
    for cls in joint.values():
        for field, spec in declared_options(cls.Config):
            assert (flag_name(field.name) in shown) == spec["joint"], field.name
    assert "--lam" not in shown  # a TAPS option: TAPS does not train tasks together
    assert "--classes" not in shown


def test_a_flag_of_another_method_is_refused_naming_its_methods(tmp_path, capsys):
    code, _, err = run(capsys, "--home", str(tmp_path), "task", "add", "t", "--base", "b",
                       "--data", "digits", "--method", "linear", "--rank", "4")
    assert code == 1
    assert_one_line_error(err, r"--rank applies to --method taps, lora, not linear")


def test_a_taps_flag_without_method_is_refused_under_the_default(tmp_path, capsys):
    """`--lam` without `--method`: the default method (adapters) has no such option; the error
    says which method has it, and nothing is recorded."""
    code, _, err = run(capsys, "--home", str(tmp_path), "task", "add", "t", "--base", "b",
                       "--data", "digits", "--lam", "1")
    assert code == 1
    assert_one_line_error(err, r"--lam applies to --method taps, not adapter")
    assert not (tmp_path / "registry.db").exists()


def test_keywords_are_sorted_by_their_declarations():
    train, run, own = split_options(
        {"epochs": 2, "lr": 0.5, "img_size": 48, "recheck": 0, "classes": "0,1", "lam": 0.3,
         "max_test": None}, TaskRequest, "taps")
    assert train == TrainConfig(epochs=2, lr=0.5)
    assert run == {"img_size": 48, "recheck": 0, "classes": "0,1"}
    assert own == {"lam": 0.3}


def test_without_an_lr_a_run_trains_at_its_method_s_default_rate():
    """Compact TAPS (the default `taps`) and fusion at 1e-2, lora and adapter at 3e-3; full deltas
    and the other methods at TrainConfig's."""
    def lr(method: str, options: dict, method_options: dict | None = None) -> float:
        return split_options(options, TaskRequest, method, method_options)[0].lr

    assert lr("taps", {}) == lr("taps", {"rank": 4}) == 1e-2
    assert lr("taps", {}, {"rank": 0}) == lr("taps", {"rank": 0}) == TrainConfig().lr == 1e-3
    assert lr("taps", {"lr": 3e-3}) == lr("taps", {"lr": 3e-3, "rank": 0}) == 3e-3
    assert lr("taps", {"lr": None}) == 1e-2
    assert lr("lora", {}) == 3e-3 and lr("lora", {"lr": 1e-3}) == 1e-3
    assert lr("adapter", {}) == 3e-3 and lr("fusion", {}, {"fuse": "a"}) == 1e-2
    assert lr("adapter", {"lr": 1e-2}) == 1e-2
    for method in ("finetune", "linear"):
        assert lr(method, {}) == 1e-3
    assert lr("progressive", {}, {"group": "g"}) == 1e-3


def test_adapters_clip_their_gradients_unless_told_otherwise():
    """Adapter and fusion tasks clip the gradients' norm to 1 by default; a typed --clip-grad
    wins, 0 turns clipping off; the other methods do not clip unless told."""
    def clip(method: str, options: dict, method_options: dict | None = None) -> float | None:
        return split_options(options, TaskRequest, method, method_options)[0].clip_grad

    assert clip("adapter", {}) == clip("fusion", {}, {"fuse": "a"}) == 1.0
    assert clip("adapter", {"clip_grad": 0.5}) == 0.5
    assert clip("adapter", {"clip_grad": 0}) == 0
    for method in ("taps", "lora", "finetune", "linear"):
        assert clip(method, {}) is None
    assert clip("taps", {"clip_grad": 2.0}) == 2.0
    with pytest.raises(MethodError, match="clip_grad must be >= 0"):
        TrainConfig(clip_grad=-1.0)


def test_task_add_without_lr_records_the_method_s_rate(tmp_path, capsys):
    """The command line passes no --lr or --clip-grad it was not given: the task records its
    method's (compact TAPS 1e-2; adapter 3e-3, clipped to 1, norms affine). No --method is the
    default method, adapters."""
    home = str(tmp_path / "home")
    code, _, err = run(capsys, "--home", home, "base", "add", "b", "--model", "timm:test_resnet")
    assert code == 0, err
    taps = ["--method", "taps"]
    for name, extra in (("compact", taps), ("full", [*taps, "--rank", "0"]),
                        ("typed", [*taps, "--lr", "2e-3"]), ("default", []),
                        ("adapter", ["--method", "adapter"]),
                        ("unclipped", ["--clip-grad", "0"])):
        code, _, err = run(capsys, "--home", home, "task", "add", name, "--base", "b", "--data",
                           "digits", "--epochs", "1", "--max-train", "40", "--max-test", "20",
                           "--img-size", "32", *extra)
        assert code == 0, err
    from taps_cl.manager import Manager

    with Manager(home) as m:
        tasks = {t.name: t for t in m.list_tasks()}
    rates = {name: t.train_config["lr"] for name, t in tasks.items()}
    clips = {name: t.train_config["clip_grad"] for name, t in tasks.items()}
    assert {name: t.method for name, t in tasks.items()} == {
        "compact": "taps", "full": "taps", "typed": "taps", "default": "adapter",
        "adapter": "adapter", "unclipped": "adapter"}
    assert rates == {"compact": 1e-2, "full": 1e-3, "typed": 2e-3, "default": 3e-3,
                     "adapter": 3e-3, "unclipped": 3e-3}
    assert clips == {"compact": None, "full": None, "typed": None, "default": 1.0,
                     "adapter": 1.0, "unclipped": 0}
    assert {name: tasks[name].method_config["rank"] for name in ("compact", "full", "typed")} == \
        {"compact": 8, "full": 0, "typed": 8}
    assert tasks["default"].method_config == tasks["adapter"].method_config
    assert tasks["adapter"].method_config["norms"] == "affine"


def test_an_unknown_keyword_names_the_method_s_options(tmp_path):
    from taps_cl.errors import MethodError
    from taps_cl.manager import Manager

    with Manager(tmp_path / "home") as m, pytest.raises(MethodError, match="no option 'lamda'"):
        m.add_base("b", "timm:test_resnet")
        m.add_task("t", "b", "digits", method="taps", lamda=1.0, epochs=1)
