"""A dependency pin's `kind` is a copy of what the pinned artifact is, and is checked as one.

`task_dependencies.kind` is an editable row; the task record stored in the task artifact holds
only (task, sha256) pairs. What a pin means comes from what it points at: a fusion pin from its
being an earlier task's task artifact, a progressive pin from the band its shared artifact's own
metadata names. Edited kinds must fail verification (with a line naming the pin), refuse
restore, and never be copied into the pins of a task that joins afterwards.
"""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest
import torch

from taps_cl import serialization
from taps_cl.errors import MethodError, TapsError
from taps_cl.manager import Manager
from taps_cl.methods.base import SharedRead, SharedWrite
from taps_cl.methods.progressive.method import ProgressiveConfig
from taps_cl.methods.progressive.sharing import (
    PIN_KINDS,
    band_blob,
    band_dependency,
    sharing_of,
)
from taps_cl.tasks.planning import earlier_task

FAST = {"epochs": 1, "batch_size": 16, "img_size": 32, "seed": 0}
# test_efficientnet has 5 blocks: 2 shared, 2 group, 1 task-specific.
PROG = {"shared_fraction": 0.4, "task_fraction": 0.2}
SHARED, GROUP = PIN_KINDS["shared"], PIN_KINDS["group"]


# ------------------------------------------------------------------------------------ helpers


def copy_home(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def sql(home: Path, statement: str, *args: object) -> None:
    """Edit the registry database behind the registry's back (sqlite3, not the ORM)."""
    con = sqlite3.connect(home / "registry.db")
    try:
        with con:
            con.execute(statement, args)
    finally:
        con.close()


def swap_band_kinds(home: Path, task: str) -> None:
    """Swap the kinds of `task`'s shared and group pins (the pinned artifacts stay)."""
    sql(home, "UPDATE task_dependencies SET kind = CASE kind "
              f"WHEN '{SHARED}' THEN '{GROUP}' WHEN '{GROUP}' THEN '{SHARED}' ELSE kind END "
              "WHERE task_id = (SELECT id FROM tasks WHERE name = ?)", task)


def true_bands(m: Manager, task: str) -> dict[str, str]:
    """sha256 → the pin kind of the band the pinned artifact's own metadata names."""
    out = {}
    for pin in m.get_task(task).depends_on:
        assert pin.task is None
        meta = serialization.metadata_from_bytes(
            m.registry.read_artifact(m.registry.get_artifact(pin.sha256)))
        out[pin.sha256] = PIN_KINDS[meta["band"]]
    return out


def row_kinds(m: Manager, task: str) -> dict[str, str]:
    return {pin.sha256: pin.kind for pin in m.get_task(task).depends_on}


def failures(m: Manager) -> dict[str, str]:
    return {c.task: c.error or "" for c in m.verify() if not c.ok}


# ----------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def fused(tmp_path_factory, image_data) -> Path:
    """An adapter task a1 and a fusion task f reading it (timm's test_resnet)."""
    home = tmp_path_factory.mktemp("fused") / "home"
    with Manager(home) as m:
        m.add_base("b", "timm:test_resnet")
        m.add_task("a1", "b", f"imagefolder:{image_data}", method="adapter", **FAST)
        m.add_task("f", "b", f"imagefolder:{image_data}", method="fusion",
                   method_options={"fuse": "a1"}, **FAST)
    return home


@pytest.fixture(scope="module")
def progressive(tmp_path_factory, image_data, image_data4) -> Path:
    """p1, the base's first progressive task (trains all bands, opens group p1), and p2,
    which joins group p1 (timm's test_efficientnet)."""
    home = tmp_path_factory.mktemp("progressive") / "home"
    with Manager(home) as m:
        m.add_base("b", "timm:test_efficientnet")
        m.add_task("p1", "b", f"imagefolder:{image_data}", method="progressive",
                   method_options=PROG, **FAST)
        m.add_task("p2", "b", f"imagefolder:{image_data4}", method="progressive",
                   group="p1", **FAST)
    return home


# -------------------------------------------------------------------------------- the checks


def test_untouched_registries_verify(fused, progressive):
    for home in (fused, progressive):
        with Manager(home) as m:
            assert failures(m) == {}
    with Manager(progressive) as m:
        for name in ("p1", "p2"):
            assert row_kinds(m, name) == true_bands(m, name)


def test_a_fusion_pin_edited_to_a_band_kind_fails_verify_and_restore(fused, tmp_path):
    home = copy_home(fused, tmp_path / "home")
    sql(home, f"UPDATE task_dependencies SET kind = '{SHARED}' "
              "WHERE task_id = (SELECT id FROM tasks WHERE name = 'f')")
    with Manager(home) as m:
        failed = failures(m)
        assert set(failed) == {"f"}, failed
        assert "'a1'" in failed["f"] and SHARED in failed["f"] and "fusion" in failed["f"]
        assert "\n" not in failed["f"]
        with pytest.raises(TapsError, match="a1"):
            m.restore("f")
        with pytest.raises(TapsError):
            m.restore_to_file("f", tmp_path / "f.safetensors")
        assert not (tmp_path / "f.safetensors").exists()
        m.restore("a1")  # the task it reads is untouched


def test_a_fusion_pin_kind_restored_verifies_again(fused, tmp_path):
    home = copy_home(fused, tmp_path / "home")
    sql(home, f"UPDATE task_dependencies SET kind = '{GROUP}'")
    with Manager(home) as m:
        assert set(failures(m)) == {"f"}
    sql(home, "UPDATE task_dependencies SET kind = 'fusion'")
    with Manager(home) as m:
        assert failures(m) == {}
        m.restore("f")


def test_swapped_band_kinds_fail_verify_naming_the_pins(progressive, tmp_path):
    home = copy_home(progressive, tmp_path / "home")
    with Manager(home) as m:
        truth = true_bands(m, "p1")
    swap_band_kinds(home, "p1")
    with Manager(home) as m:
        assert row_kinds(m, "p1") == {sha: {SHARED: GROUP, GROUP: SHARED}[kind]
                                      for sha, kind in truth.items()}
        failed = failures(m)
        assert set(failed) == {"p1"}, failed  # p2 pins the same artifacts with true kinds
        line = failed["p1"]
        assert "\n" not in line
        for sha, kind in truth.items():
            assert f"{sha[:12]}…" in line
        assert "by its own metadata" in line
        with pytest.raises(TapsError, match="p1"):
            m.restore("p1")
        m.restore("p2")


def test_swapped_kinds_are_not_copied_by_a_task_that_joins(progressive, tmp_path, image_data):
    home = copy_home(progressive, tmp_path / "home")
    swap_band_kinds(home, "p1")  # the task a joiner takes the base's bands from
    with Manager(home) as m:
        before = {a.sha256 for a in m.registry.list_artifacts()}
        try:
            m.add_task("p3", "b", f"imagefolder:{image_data}", method="progressive",
                       group="p1", **FAST)
        except TapsError as exc:
            # Planned from the edited rows, the read is refused against the artifact's own
            # band; nothing is written.
            assert "by its own metadata" in str(exc)
            assert "p3" not in {t.name for t in m.list_tasks()}
            assert {a.sha256 for a in m.registry.list_artifacts()} == before
        else:
            # Planned from the artifacts' own bands: the true kinds, the group's artifacts.
            assert row_kinds(m, "p3") == true_bands(m, "p3")
            assert set(row_kinds(m, "p3")) == set(true_bands(m, "p2"))
            assert "p3" not in failures(m)


def test_a_joiner_keeps_the_true_kinds_when_another_member_s_are_swapped(
        progressive, tmp_path, image_data):
    home = copy_home(progressive, tmp_path / "home")
    swap_band_kinds(home, "p2")
    with Manager(home) as m:
        m.add_task("p3", "b", f"imagefolder:{image_data}", method="progressive", group="p1",
                   **FAST)
        assert row_kinds(m, "p3") == true_bands(m, "p3")
        assert row_kinds(m, "p3") == true_bands(m, "p1")  # the group's shared and group bands
        assert set(failures(m)) == {"p2"}
        m.restore("p3")


def test_sharing_takes_bands_from_the_artifacts_not_the_rows(progressive, tmp_path):
    home = copy_home(progressive, tmp_path / "home")
    with Manager(home) as m:
        truth = {kind: sha for sha, kind in true_bands(m, "p1").items()}
    swap_band_kinds(home, "p1")
    swap_band_kinds(home, "p2")
    with Manager(home) as m:
        earlier = [earlier_task(t) for t in m.registry.list_tasks("b", ready_only=True)]

        def read(sha256: str) -> bytes:
            return m.registry.read_artifact(m.registry.get_artifact(sha256))

        sharing = sharing_of(earlier, read)
        assert sharing.shared_sha256 == truth[SHARED]
        assert sharing.groups["p1"].group_sha256 == truth[GROUP]
        assert sharing.groups["p1"].members == ("p1", "p2")
        # From the rows alone the bands come out swapped: what a planner without `read` gets,
        # and why a SharedRead checks its kind against the artifact.
        assert sharing_of(earlier).shared_sha256 == truth[GROUP]


def test_a_shared_read_or_write_must_have_its_artifact_s_kind():
    tensors = {"module/x": torch.zeros(2)}
    for band, kind in PIN_KINDS.items():
        dep = band_dependency(band_blob(ProgressiveConfig(), band, "g", tensors, "0" * 64))
        assert dep.kind == kind
        SharedRead(dep, "a" * 64, kind)
        SharedWrite(b"", kind, 2, dep)
        other = GROUP if kind == SHARED else SHARED
        with pytest.raises(MethodError, match="aaaaaaaaaaaa…"):
            SharedRead(dep, "a" * 64, other)
        with pytest.raises(MethodError):
            SharedWrite(b"", other, 2, dep)
