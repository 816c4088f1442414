"""Two registry handles in one process: the first one's commits stay visible to other processes.

Opening a registry used to read the SQLite header with open()/close(); closing any descriptor of
a file drops every POSIX lock the process holds on it, so the next process to close its
connection took itself for the last one and deleted the WAL the first handle still wrote to:
its later commits vanished for every other process (found by benchmarks/scale.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from registry import Registry, runs

ROOT = Path(__file__).resolve().parents[1]


def _add_task(reg: Registry, name: str) -> None:
    started = reg.begin_task(name, base="b", method="linear", method_config={}, train_config={},
                             dataset_spec={}, class_names=["a"], run_host=runs.this_host(),
                             run_pid=os.getpid())
    assert started.run_token is not None
    reg.finish_task(started.run_token, task_blob=name.encode(), task_num_params=1,
                    probe_blob=b"probe-" + name.encode(), probe_num_params=1, layers=[],
                    head_params=1, train_seconds=0.0, test_accuracy=0.5, test_loss=1.0,
                    test_samples=1)


def _count_elsewhere(home: Path) -> int:
    """The number of tasks another process sees (it opens, reads and closes the registry)."""
    code = ("import sys; from registry import Registry\n"
            "with Registry(sys.argv[1], create=False) as r: print(r.count_tasks())")
    done = subprocess.run([sys.executable, "-c", code, str(home)], capture_output=True,
                          text=True, cwd=ROOT, timeout=120, check=True)
    return int(done.stdout)


def test_a_second_handle_does_not_hide_the_first_handles_commits(tmp_path):
    home = tmp_path / "home"
    with Registry(home) as reg:
        reg.add_base("b", model_spec="timm:x", architecture="x", weights=b"w",
                     weights_num_params=1, num_params=1, total_params=1, data_config={},
                     head_keys=[])
        for i in range(3):
            _add_task(reg, f"before{i}")
        Registry(home, create=False).close()  # e.g. `with Manager(home) as other:` meanwhile
        assert _count_elsewhere(home) == 3  # that process closes: it must not drop our WAL
        for i in range(3):
            _add_task(reg, f"after{i}")
        assert reg.count_tasks() == 6
        assert _count_elsewhere(home) == 6
        assert (home / "registry.db-wal").exists()  # still the one this handle writes to
    assert _count_elsewhere(home) == 6
