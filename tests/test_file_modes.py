"""Files taps-cl writes get the mode the user's umask gives (0644 under 0022, 0640 under 0027),
not mkstemp's 0600: artifacts (local stores, and objects over this machine's disk), the store's
marker, and exported files (`restore --out`, `write_atomic`), so a team reads them on a shared
mount. When the tests run as root, a second, unprivileged user reads each file too."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from registry import Registry
from registry.store import MARKER, ArtifactStore
from taps_cl.manager import Manager
from taps_cl.models.files import write_atomic
from tests.test_registry import add_base, begin, finish

FIXTURE = Path(__file__).parent / "fixtures" / "registry_e113eb4"
UMASKS = {0o022: 0o644, 0o027: 0o640}
AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("runuser") is not None


@pytest.fixture(params=sorted(UMASKS), ids=lambda m: f"umask{m:04o}")
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    before = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(before)


@pytest.fixture
def shared() -> Iterator[Path]:
    """A directory others may enter (pytest's tmp_path is 0700 all the way up)."""
    path = Path(tempfile.mkdtemp(prefix="taps-modes-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def assert_team_readable(path: Path, mask: int) -> None:
    """The file has the umask's mode; an unprivileged user that the mode admits reads it."""
    assert stat.S_IMODE(path.stat().st_mode) == UMASKS[mask], f"{path}: {path.stat().st_mode:o}"
    if not AS_ROOT:
        return  # the mode assertion above still ran
    # Under 0022 anyone may read (nobody, as "other"); under 0027 the file's group may (nobody
    # in root's group, the group the file was created with).
    group = "root" if mask == 0o027 else "nogroup"
    read = subprocess.run(["runuser", "-u", "nobody", "-g", group, "--", "cat", str(path)],
                          capture_output=True, timeout=60)
    assert read.returncode == 0, read.stderr.decode()
    assert read.stdout == path.read_bytes()


def test_artifacts_and_marker_of_a_local_store(umask, shared):
    with Registry(shared / "home", artifacts=str(shared / "store")) as reg:
        base = add_base(reg)
        task = finish(reg, begin(reg, "t1"), b"task-blob")
        paths = [reg.store.path_of(a.path) for a in (base.weights, task.artifact, task.probe)]
    for path in (*paths, shared / "store" / MARKER):
        assert_team_readable(Path(path), umask)


def test_default_store_artifacts(umask, shared):
    with Registry(shared / "home") as reg:
        base = add_base(reg)
        path = Path(reg.store.path_of(base.weights.path))
    assert_team_readable(path, umask)


def test_objects_on_this_machines_disk(umask, shared):
    # A chained fsspec URL over the local disk goes through registry.objects, not the
    # local-directory code path; its objects are plain files of this machine.
    root = shared / "cached"
    store = ArtifactStore(f"simplecache::file://{root}")
    assert not store.is_local
    sha, relative = store.write(b"object bytes")
    assert store.read(relative, sha) == b"object bytes"
    assert store.write_marker(b"{}")
    for path in (root / relative, root / MARKER):
        assert_team_readable(path, umask)


def test_write_atomic(umask, shared):
    out = shared / "exports" / "model.safetensors"
    write_atomic(out, b"first")
    assert_team_readable(out, umask)
    write_atomic(out, b"second")  # replacing keeps the umask's mode too
    assert out.read_bytes() == b"second"
    assert_team_readable(out, umask)
    assert [p.name for p in out.parent.iterdir()] == ["model.safetensors"]  # no temp left


def test_restore_out_file(umask, shared):
    home = shared / "home"
    shutil.copytree(FIXTURE, home)
    with Manager(home) as m:
        out = m.restore_to_file("lin", shared / "lin.safetensors")
    assert_team_readable(out, umask)
