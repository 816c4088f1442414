"""Fault injected: the disk fills up while `task add` writes its artifact files.

Two real ways a write runs out of room, neither simulated in the store's code:

* ``ENOSPC``: the registry's artifact directory is a small tmpfs mounted for the test (as root;
  where mounting is not permitted it skips, and fails in CI, where it must run: the ``EFBIG`` one
  runs anywhere);
* ``EFBIG``: the command runs in a child process whose file size limit (``RLIMIT_FSIZE``, with
  SIGXFSZ ignored, so the write fails instead of killing the process) is below the size of the
  task's probe file, its second and largest.

Either way the task's first file (its tensors) is written whole and the second is cut off half
way. Afterwards: the command said so in one `Error:` line (exit 1, no traceback), no task row
was recorded, no file of the failed write is visible (under its final name or as a temp file),
`gc` finds nothing to remove, no row points at nothing and the earlier task verifies.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from registry.store import ArtifactStore
from taps_cl.manager import Manager
from tests.conftest import make_imagefolder
from tests.faults import LOG_LINE, WARNING_LINE, assert_one_error, told  # noqa: F401
from tests.servers import require_or_skip
from tests.test_cli import run

REPO = Path(__file__).resolve().parents[1]
# Seconds the child command may take (importing torch and training one epoch on a busy machine).
CHILD_DEADLINE = 600
# Seconds mount/umount may take.
MOUNT_DEADLINE = 30
# Log lines (`WARNING registry.artifacts: …`) are not what the command says.
FAST = ("--method", "linear", "--epochs", "1", "--img-size", "32", "--batch-size", "16")


# ------------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_imagefolder(tmp_path_factory.mktemp("disk_fault_data"))


@pytest.fixture(scope="module")
def template(tmp_path_factory, data) -> Path:
    """A registry (default store: ``<home>/artifacts``) with base b and one ready task, a."""
    home = tmp_path_factory.mktemp("disk_fault_template") / "home"
    with Manager(home) as m:
        m.add_base("b", "timm:test_efficientnet")
        m.add_task("a", "b", f"imagefolder:{data}", method="linear", epochs=1, batch_size=16,
                   img_size=32)
    return home


def probe_bytes(home: Path) -> int:
    """The size of task a's probe file: a new task's (same data, same method) is the same."""
    with Manager(home) as m:
        (task,) = m.list_tasks()
        assert task.probe is not None and task.artifact is not None
        assert task.artifact.bytes < task.probe.bytes // 4  # the first file fits, the second not
        return task.probe.bytes


def store_files(home: Path) -> set[str]:
    """Every file of the store (temp files included), other than the test's filler."""
    return {rel for rel, _, _ in ArtifactStore(home / "artifacts").files() if rel != FILLER}




def assert_nothing_left(capsys, home: Path, files_before: set[str]) -> None:
    """Nothing of the failed add is left and the earlier task verifies."""
    assert store_files(home) == files_before  # no half-written file, final or temp
    with Manager(home) as m:
        assert {t.name: t.status for t in m.list_tasks()} == {"a": "ready"}  # no n, no training
        reg = m.registry
        for artifact in reg.list_artifacts():  # no row points at nothing
            assert reg.store.exists(artifact.path), artifact
        assert m.find_garbage() == []
        report = m.accuracy("b", verify=True, workers=1)
        assert report.verified is True, report
        assert report.verified_tasks == ("a",)
    code, out, err = run(capsys, "--home", str(home), "gc")
    assert (code, out.splitlines(), err) == (
        0, ["no garbage: every artifact file is referenced"], "")


# ------------------------------------------------------------------ ENOSPC: a small tmpfs
FILLER = "filler.bin"  # fills the tmpfs; not an artifact file, so gc leaves it alone


def _mount(path: Path, size: str) -> None:
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        require_or_skip("a small filesystem needs root to mount a tmpfs (the EFBIG test runs "
                        "anyway)")
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs",
                               str(path)], capture_output=True, text=True,
                              timeout=MOUNT_DEADLINE, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        require_or_skip(f"cannot mount a tmpfs here: {exc}")
    if done.returncode != 0:
        require_or_skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")


def _umount(path: Path) -> None:
    for args in (["umount", str(path)], ["umount", "-l", str(path)]):
        try:
            if subprocess.run(args, capture_output=True, timeout=MOUNT_DEADLINE,
                              check=False).returncode == 0:
                return
        except (OSError, subprocess.TimeoutExpired):
            pass


@pytest.fixture
def small_home(template, tmp_path) -> Iterator[Path]:
    """A copy of the template whose artifact directory is a 4 MiB tmpfs, unmounted after."""
    home = tmp_path / "home"
    shutil.copytree(template, home, ignore=shutil.ignore_patterns("artifacts"))
    store = home / "artifacts"
    store.mkdir()
    _mount(store, "4m")
    try:
        shutil.copytree(template / "artifacts", store, dirs_exist_ok=True)
        yield home
    finally:
        _umount(store)


def fill(root: Path, leave: int) -> None:
    """Write a filler file until only about `leave` bytes of the filesystem are free."""
    stat = os.statvfs(root)
    free = stat.f_bavail * stat.f_frsize
    assert free > leave, (free, leave)
    chunk = b"\0" * (1 << 16)
    todo = free - leave
    with open(root / FILLER, "wb") as handle:
        while todo > 0:
            handle.write(chunk[:todo])
            todo -= min(todo, len(chunk))
    stat = os.statvfs(root)
    assert stat.f_bavail * stat.f_frsize <= leave + (1 << 16)


def test_disk_full_while_add_writes_leaves_nothing(small_home, data, capsys, caplog):
    home = small_home
    probe = probe_bytes(home)
    before = store_files(home)
    fill(home / "artifacts", probe // 2)  # the task file fits, its probe file does not
    code, _, err = run(capsys, "--home", str(home), "task", "add", "n", "--base", "b",
                       "--data", f"imagefolder:{data}", *FAST)
    assert_one_error(code, err, rf"cannot write artifact into \S+: {os.strerror(errno.ENOSPC)}$",
                     caplog)
    assert_nothing_left(capsys, home, before)


# ---------------------------------------------------- EFBIG: a file size limit on the process
# The real console entry under a file size limit; SIGXFSZ ignored, so writes fail with EFBIG.
LIMITED = """
import resource, signal, sys
limit = int(sys.argv.pop(1))
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
from taps_cl.cli.app import main
main(sys.argv[1:])
"""


@pytest.fixture
def home(template, tmp_path) -> Path:
    copy = tmp_path / "home"
    shutil.copytree(template, copy)
    return copy


def test_file_size_limit_while_add_writes_leaves_nothing(home, data, capsys):
    probe = probe_bytes(home)
    # Between the database's size (its WAL grows by a few pages a transaction) and the probe's.
    database = (home / "registry.db").stat().st_size
    limit = (database + probe) // 2
    assert database + (64 << 10) < limit < probe - (64 << 10), (database, probe)
    before = store_files(home)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    try:
        done = subprocess.run(
            [sys.executable, "-c", LIMITED, str(limit), "--home", str(home), "task", "add", "n",
             "--base", "b", "--data", f"imagefolder:{data}", *FAST],
            capture_output=True, text=True, env=env, cwd=REPO, timeout=CHILD_DEADLINE,
            check=False)
    except subprocess.TimeoutExpired as exc:  # run() kills the child before raising
        pytest.fail(f"the limited `task add` did not end in {CHILD_DEADLINE} s: {exc.stderr}")
    assert_one_error(done.returncode, done.stderr,
                     rf"cannot write artifact into \S+: {os.strerror(errno.EFBIG)}$")
    assert_nothing_left(capsys, home, before)
