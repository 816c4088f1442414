"""`taps-cl predict --task A,B` and `--all`: one shared pass, the same answers as `predict NAME`."""

from __future__ import annotations

import json
import shutil

import pytest

from taps_cl.manager import Manager
from tests.test_cli import assert_one_line_error, run
from tests.test_serving_model import registry_home

# One torch thread: a second busy process on 2 cores makes OpenMP threads spin-wait.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def home(tmp_path_factory, image_data, image_data4) -> str:
    """The timm registry of tests/test_serving_model.py (one task per method, and more)."""
    return str(registry_home(tmp_path_factory, "timm:test_efficientnet", image_data,
                             image_data4))


@pytest.fixture(scope="module")
def images(image_data) -> list[str]:
    return [str(p) for cls in ("checker", "hstripes")
            for p in sorted((image_data / "test" / cls).glob("*.png"))[:2]]


def single(capsys, home: str, name: str, images: list[str]) -> list[dict]:
    code, out, err = run(capsys, "--home", home, "--json", "predict", name, *images)
    assert code == 0, err
    return json.loads(out)


def assert_same(many: list[dict], home: str, names: list[str], images: list[str],
                capsys) -> None:
    """Each image's entry for each task equals what `predict TASK` says about that image."""
    assert [row["image"] for row in many] == images
    for name in names:
        alone = single(capsys, home, name, images)
        for row, one in zip(many, alone):
            (entry,) = [e for e in row["tasks"] if e["task"] == name]
            assert [c["class"] for c in entry["top"]] == [c["class"] for c in one["top"]]
            for got, want in zip(entry["top"], one["top"]):
                assert got["probability"] == pytest.approx(want["probability"], abs=1e-5)


def test_task_list_equals_each_task_alone(capsys, home, images):
    names = ["p2", "linear", "taps_r", "fusion"]
    code, out, err = run(capsys, "--home", home, "--json", "predict", "--task", ",".join(names),
                         "--top", "2", *images)
    assert code == 0, err
    many = json.loads(out)
    assert [[e["task"] for e in row["tasks"]] for row in many] == [names] * len(images)
    assert all(len(e["top"]) == 2 for row in many for e in row["tasks"])
    code, out, _ = run(capsys, "--home", home, "predict", "--task", ",".join(names), *images)
    assert code == 0 and f"{images[0]}:" in out and "  taps_r: " in out
    code, out, err = run(capsys, "--home", home, "--json", "predict", "--task",
                         ",".join(names), *images)
    assert code == 0, err
    assert_same(json.loads(out), home, names, images, capsys)


def test_all_runs_every_ready_task_of_the_base(capsys, home, images):
    code, out, err = run(capsys, "--home", home, "--json", "predict", "--all", *images[:2])
    assert code == 0, err
    many = json.loads(out)
    with Manager(home) as m:
        ready = [t.name for t in m.list_tasks("b") if t.status == "ready"]
    assert [e["task"] for e in many[0]["tasks"]] == ready
    assert_same(many, home, ready, images[:2], capsys)


def test_all_needs_a_base_when_there_are_several(capsys, home, images, tmp_path):
    two = str(tmp_path / "two")
    shutil.copytree(home, two)
    with Manager(two) as m:
        m.add_base("other", "timm:test_efficientnet")
    code, _, err = run(capsys, "--home", two, "predict", "--all", images[0])
    assert code == 1
    assert_one_line_error(err, r"choose a base with --base \(b, other\)")
    code, out, err = run(capsys, "--home", two, "--json", "predict", "--all", "--base", "b",
                         images[0])
    assert code == 0, err
    assert len(json.loads(out)[0]["tasks"]) == len(Manager(two).list_tasks("b"))
    code, _, err = run(capsys, "--home", two, "predict", "--all", "--base", "other", images[0])
    assert code == 1
    assert_one_line_error(err, "base 'other' has no ready task")


@pytest.mark.parametrize("args, pattern", [
    (["--task", "linear,nope"], "nope"),
    (["--task", "linear"], "image '.*missing.png' does not exist"),
])
def test_bad_tasks_and_images_are_one_line_errors(capsys, home, images, args, pattern):
    extra = [] if "nope" in pattern else [str(images[0]).replace("000", "missing")]
    code, _, err = run(capsys, "--home", home, "predict", *args, images[0], *extra)
    assert code == 1
    assert_one_line_error(err, pattern)


@pytest.mark.parametrize("args", [
    ["--task", "linear", "--all"],
    ["--base", "b", "--task", "linear"],
    ["linear"],  # NAME without an image
    ["--task", ","],
])
def test_bad_usage_exits_2(capsys, home, args):
    code, _, err = run(capsys, "--home", home, "predict", *args)
    assert code == 2, err
    assert "Traceback" not in err
