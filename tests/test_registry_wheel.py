"""The migrations ship inside the wheel as `registry.migrations`; `db upgrade` works from it.

The source tree keeps them in a top-level `migrations/` (setuptools `package-dir` maps it), so
a non-editable install must carry registry/migrations/versions and no top-level `migrations`.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _copy_source(target: Path) -> Path:
    # Build from a copy of the checkout: an in-tree build would write build/ and *.egg-info
    # into the working tree other processes are using.
    ignore = shutil.ignore_patterns(
        ".git", ".venv", "venv", ".taps-cl", ".pytest_cache", "__pycache__", "*.pyc",
        "*.egg-info", "build", "dist",
    )
    return Path(shutil.copytree(ROOT, target, ignore=ignore, symlinks=True))


def test_wheel_installs_migrations_as_registry_package(tmp_path):
    source = _copy_source(tmp_path / "src")
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "-q", "-w", str(wheels), str(source)],
        check=True, capture_output=True, text=True, cwd=tmp_path,
    )
    (wheel,) = wheels.glob("taps_cl-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "registry/migrations/env.py" in names and "registry/migrations/script.py.mako" in names
    assert not [n for n in names if n.startswith("migrations/")]

    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--disable-pip-version-check",
         "-q", "--target", str(site), str(wheel)],
        check=True, capture_output=True, text=True, cwd=tmp_path,
    )
    versions = site / "registry" / "migrations" / "versions"
    shipped = {p.name for p in versions.glob("0*.py")}
    in_tree = {p.name for p in (ROOT / "migrations" / "versions").glob("0*.py")}
    assert shipped == in_tree and "0003_run_tokens_late_positions.py" in shipped
    assert not (site / "migrations").exists()

    script = (
        "import sys\n"
        "from registry import db\n"
        "engine = db.make_engine(db.sqlite_url('reg/registry.db'))\n"
        "before, after, backup = db.upgrade(engine)\n"
        "assert db.current_revision(engine) == db.head_revision() == after, (before, after)\n"
        "print(db.__file__)\n"
        "print(db.migrations_dir())\n"
    )
    work = tmp_path / "work"
    work.mkdir()
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", script], cwd=work, env=env,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    module_file, migrations = run.stdout.split()
    assert Path(module_file).is_relative_to(site), module_file
    assert Path(migrations) == (site / "registry" / "migrations").resolve()
    assert (work / "reg" / "registry.db").stat().st_size > 0
