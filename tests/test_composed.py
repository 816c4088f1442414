"""Tasks built on earlier tasks end to end: adapters, fusion, pinned dependencies, export,
delete; and the invariants every registered method must keep."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors.torch import load
from sqlalchemy import text

import taps_cl
from taps_cl.errors import TapsError
from taps_cl.manager import Manager
from taps_cl.methods.catalog import load_builtin
from tests.test_cli import assert_one_line_error, run

# Every built-in method (the catalog imports them on the first lookup).
METHODS = load_builtin()

FAST = dict(epochs=1, batch_size=16, img_size=32, seed=0)


@pytest.fixture(scope="module")
def composed(tmp_path_factory, image_data, image_data4):
    """A registry with two adapter tasks and a fusion task reading both."""
    home = tmp_path_factory.mktemp("composed") / "home"
    with Manager(home) as m:
        m.add_base("b", "timm:test_efficientnet")
        m.add_task("a1", "b", f"imagefolder:{image_data}", method="adapter", **FAST)
        m.add_task("a2", "b", f"imagefolder:{image_data4}", method="adapter", **FAST)
        m.add_task("f", "b", f"imagefolder:{image_data}", method="fusion",
                   method_options={"fuse": "a1,a2"}, **FAST)
    return home


def files(m: Manager) -> dict[str, bytes]:
    return {a.sha256: m.registry.store.path_of(a.path).read_bytes()
            for a in m.registry.list_artifacts()}


def test_fusion_pins_its_dependencies_and_restores_exactly(composed, tmp_path):
    with Manager(composed) as m:
        task = m.get_task("f")
        pins = {(p.task, p.sha256) for p in task.depends_on}
        assert pins == {(n, m.get_task(n).artifact.sha256) for n in ("a1", "a2")}
        probe = load(m.registry.read_artifact(task.probe))
        model = m.restore("f")
        assert type(model) is type(timm.create_model("test_efficientnet"))
        with torch.no_grad():
            assert (model(probe["inputs"]) - probe["logits"]).abs().max() <= 1e-5
            assert (probe["trained_logits"] - probe["logits"]).abs().max() <= 1e-5
        out = m.restore_to_file("f", tmp_path / "f.safetensors")
    again = taps_cl.load_file(out)  # no registry involved
    with torch.no_grad():
        assert (again(probe["inputs"]) - probe["logits"]).abs().max() <= 1e-5
    assert not any(c for c in Manager(composed).verify() if not c.ok)


def test_fusion_stores_only_its_own_tensors(composed):
    with Manager(composed) as m:
        own = set(load(m.registry.read_artifact(m.get_task("f").artifact)))
        for dep in ("a1", "a2"):
            theirs = set(load(m.registry.read_artifact(m.get_task(dep).artifact)))
            assert not {k for k in own & theirs if k.startswith("module/")}
        rep = m.budget()
        row = next(r for r in rep.tasks if r.name == "f")
        assert row.depends_on == ("a1", "a2")
        shown = m.get_task("a1")
        assert {layer.kind for layer in shown.layers} == {"adapter"}


def test_delete_is_refused_while_another_task_reads_it(composed, tmp_path, capsys):
    import shutil

    home = tmp_path / "copy"
    shutil.copytree(composed, home)
    code, _, err = run(capsys, "--home", str(home), "task", "delete", "a1")
    assert code == 1
    assert_one_line_error(err, "f depend")
    with Manager(home) as m:
        before = files(m)
        f = m.get_task("f")
        f_files = {f.artifact.sha256, f.probe.sha256, f.signature.sha256}
        removed = m.delete_task("f")
        assert len(removed) == 3  # its artifact, probe batch and signature
        after = files(m)
        assert set(after) == set(before) - f_files  # only f's own files went
        assert all(after[sha] == data for sha, data in after.items() if sha in before)
        m.delete_task("a1")
        assert [t.name for t in m.list_tasks()] == ["a2"]
        assert not [c for c in m.verify() if not c.ok]


def test_tampered_pin_fails_verify(composed, tmp_path):
    import shutil

    home = tmp_path / "copy"
    shutil.copytree(composed, home)
    with Manager(home) as m:
        with m.registry.engine.begin() as conn:
            conn.execute(text(
                "UPDATE task_dependencies SET artifact_id = (SELECT probe_artifact_id FROM tasks "
                "WHERE name = 'a1') WHERE depends_on_task_id = (SELECT id FROM tasks "
                "WHERE name = 'a1')"))
        failed = {c.task: c.error for c in m.verify() if not c.ok}
        assert "f" in failed and "a1" not in failed
        with pytest.raises(TapsError):
            m.restore("f")


@pytest.mark.parametrize("options, pattern", [
    ({"fuse": "nosuch"}, "no task 'nosuch'"),
    ({"fuse": "t"}, "adapter"),  # a TAPS task has no adapters to fuse
])
def test_bad_dependencies_are_refused_before_training(tmp_path, image_data, options, pattern):
    with Manager(tmp_path / "home") as m:
        m.add_base("b", "timm:test_efficientnet")
        m.add_task("t", "b", f"imagefolder:{image_data}", method="linear", **FAST)
        before = files(m)
        with pytest.raises(TapsError, match=pattern):
            m.add_task("f", "b", f"imagefolder:{image_data}", method="fusion",
                       method_options=options, **FAST)
        assert [t.name for t in m.list_tasks()] == ["t"] and files(m) == before


def test_dependency_on_another_base_is_refused(tmp_path, image_data, capsys):
    home = str(tmp_path / "home")
    with Manager(home) as m:
        m.add_base("b", "timm:test_efficientnet")
        m.add_base("b2", "timm:test_efficientnet")
        m.add_task("a", "b", f"imagefolder:{image_data}", method="adapter", **FAST)
    code, _, err = run(capsys, "--home", home, "task", "add", "f", "--base", "b2", "--data",
                       f"imagefolder:{image_data}", "--method", "fusion", "--fuse", "a",
                       "--img-size", "32", "--epochs", "1")
    assert code == 1
    assert_one_line_error(err, "on base 'b'")
    code, out, _ = run(capsys, "--home", home, "--json", "task", "list")
    assert [t["name"] for t in json.loads(out)] == ["a"]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_rebuilds_exactly_and_leaves_earlier_tasks_untouched(
        tmp_path, image_data, image_data4, method):
    spec, other = f"imagefolder:{image_data}", f"imagefolder:{image_data4}"
    with Manager(tmp_path / "home") as m:
        m.add_base("b", "timm:test_efficientnet")
        options = {}
        if method == "fusion":
            m.add_task("dep", "b", other, method="adapter", **FAST)
            options = {"fuse": "dep"}
        m.add_task("x", "b", spec, method=method, method_options=options, **FAST)
        task = m.get_task("x")
        probe = load(m.registry.read_artifact(task.probe))
        with torch.no_grad():
            rebuilt = m.restore("x")(probe["inputs"])
        assert (rebuilt - probe["logits"]).abs().max() <= 1e-5
        before = files(m)
        result = m.add_task("later", "b", other, method="adapter", **FAST)
        after = files(m)
        assert all(after[sha] == data for sha, data in before.items())
        assert all(c.ok and c.max_drift == 0.0 for c in result.probe_checks)
        assert m.get_task("x") == task
