"""Concurrent writers on one team registry: four `taps-cl task add` at once.

Each repetition registers a fresh base (`timm:test_resnet`, tiny, random init) and starts four
real `taps-cl task add` processes on it at the same moment (linear probes, one epoch on small
generated images), while a reader runs `task list --json` and `report budget --json` in a loop
until the last writer exits. Then it checks what landed: every task ready at its own position,
no lock error ("database is locked", deadlock, lock timeout) in any writer's or reader's output,
every read answered, and `report accuracy --verify` passing on the base.

    python benchmarks/team.py --db sqlite --repeats 5     # a SQLite file in a temp home
    python benchmarks/team.py --db postgres --repeats 5   # a PostgreSQL server it starts itself
    python benchmarks/team.py --db postgresql+psycopg://user:pw@host/db   # an existing registry

`--db postgres` starts a throwaway server from Debian's binaries with the tests' launcher
(tests/pgserver.py, so from a source checkout: initdb and pg_ctl in a temp dir, 127.0.0.1 only,
as user `postgres` when run by root) and stops it at the end. With a URL, each run adds bases
and tasks with a random tag to that registry (the artifacts go to the temp home). Prints one
line per repetition and a total (or one JSON document with --json); exit status 0 only if
every repetition landed every task, verified, with no lock error and no failed read. Run it
alone: four torch processes share the cores.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

REPO_ROOT = Path(__file__).resolve().parents[1]  # the source checkout (holds tests/)
MODEL = "timm:test_resnet"  # tiny, random init: nothing to download
# What a writer or reader prints when the database refused it a lock (SQLite or PostgreSQL).
LOCK_ERROR = re.compile(r"database is locked|deadlock|could not obtain lock|lock timeout|"
                        r"lock not available", re.IGNORECASE)
# Seconds a single command may take before the run counts it as failed (a hang, not slowness).
COMMAND_TIMEOUT = 600
# Seconds the reader waits between its rounds: reads go on during the writes without taking
# the cores the writers train on.
READ_PAUSE = 0.5
CLASSES = ("hstripes", "vstripes", "blob")


@dataclass(frozen=True)
class Round:
    """What one repetition of the concurrent adds showed."""

    repetition: int  # 1-based
    base: str  # the base model the writers added to
    writers: int  # `task add` processes started at once
    landed: int  # of their tasks, how many are ready afterwards
    positions: tuple[int, ...]  # the landed tasks' positions, sorted
    lock_errors: int  # writer and reader outputs that name a lock error
    reads: int  # reader commands run while writers were running
    read_failures: int  # of those, how many failed (exit status or output)
    verified: bool  # `report accuracy --verify` passed with the whole matrix verified
    failures: tuple[str, ...]  # one line per command that failed, for the report
    seconds: float  # wall time of the repetition

    @property
    def ok(self) -> bool:
        """Every task landed at distinct positions, verified; no lock error, no failed read."""
        return (self.landed == self.writers and len(set(self.positions)) == self.writers
                and self.lock_errors == 0 and self.read_failures == 0 and self.verified
                and not self.failures)


def make_images(root: Path, n_train: int = 12, n_test: int = 6, size: int = 32) -> Path:
    """root/{train,test}/<class>/*.png: stripes of two orientations and a blob, with noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:size, 0:size]
    for split, count in (("train", n_train), ("test", n_test)):
        for cls in CLASSES:
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                period = int(rng.integers(4, 8))
                if cls == "hstripes":
                    mask = (y // (period // 2)) % 2
                elif cls == "vstripes":
                    mask = (x // (period // 2)) % 2
                else:
                    cy, cx = rng.integers(size // 4, 3 * size // 4, size=2)
                    mask = ((y - cy) ** 2 + (x - cx) ** 2) < (size // 4) ** 2
                color = rng.integers(60, 256, size=3)
                img = mask[..., None] * color + rng.normal(0, 12, (size, size, 3))
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
                    folder / f"{i:03d}.png")
    return root


def taps_cl(home: Path, db_url: Optional[str], *args: str) -> list[str]:
    """The argv of one `taps-cl` call on the registry (this interpreter, `-m taps_cl`)."""
    return [sys.executable, "-m", "taps_cl", "--home", str(home),
            *(["--db", db_url] if db_url else []), *args]


def _env() -> dict[str, str]:
    # One thread per process: four torch processes on a few cores would otherwise spin-wait.
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _first_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no output)"


def run_round(repetition: int, home: Path, db_url: Optional[str], data: Path, *,
              writers: int = 4, epochs: int = 1, tag: str = "") -> Round:
    """One repetition: a fresh base, `writers` concurrent adds, a reader loop, then --verify."""
    started = time.perf_counter()
    base = f"team{tag}r{repetition}"
    names = [f"{base}w{i}" for i in range(writers)]
    failures: list[str] = []
    lock_errors = 0
    added = subprocess.run(taps_cl(home, db_url, "base", "add", base, "--model", MODEL),
                           capture_output=True, text=True, env=_env(), timeout=COMMAND_TIMEOUT,
                           check=False)
    if added.returncode != 0:
        raise RuntimeError(f"base add failed: {_first_line(added.stderr)}")

    logs = Path(tempfile.mkdtemp(prefix="team-logs-"))
    procs = []
    try:
        for i, name in enumerate(names):
            out, err = (logs / f"{name}.out").open("w"), (logs / f"{name}.err").open("w")
            procs.append((name, out, err, subprocess.Popen(
                taps_cl(home, db_url, "--json", "task", "add", name, "--base", base,
                        "--data", f"imagefolder:{data}", "--method", "linear",
                        "--epochs", str(epochs), "--img-size", "32", "--batch-size", "16",
                        "--seed", str(i)),
                stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=_env())))
        reads = read_failures = 0
        while True:  # at least one round of reads, however fast the writers are
            for args in (("task", "list", "--base", base), ("report", "budget", "--base", base)):
                read = subprocess.run(taps_cl(home, db_url, "--json", *args), capture_output=True,
                                      text=True, env=_env(), timeout=COMMAND_TIMEOUT, check=False)
                reads += 1
                lock_errors += bool(LOCK_ERROR.search(read.stdout + read.stderr))
                try:
                    json.loads(read.stdout)
                    parsed = True
                except ValueError:
                    parsed = False
                if read.returncode != 0 or not parsed:
                    read_failures += 1
                    failures.append(f"{' '.join(args)}: exit {read.returncode}: "
                                    f"{_first_line(read.stderr)}")
            if all(proc.poll() is not None for *_, proc in procs):
                break
            time.sleep(READ_PAUSE)
        for name, out, err, proc in procs:
            proc.wait(timeout=COMMAND_TIMEOUT)
            out.close()
            err.close()
            output = (logs / f"{name}.out").read_text() + (logs / f"{name}.err").read_text()
            lock_errors += bool(LOCK_ERROR.search(output))
            if proc.returncode != 0:
                failures.append(f"task add {name}: exit {proc.returncode}: "
                                f"{_first_line((logs / f'{name}.err').read_text())}")
    finally:
        for *_, proc in procs:
            if proc.poll() is None:
                proc.kill()
        shutil.rmtree(logs, ignore_errors=True)

    listed = subprocess.run(taps_cl(home, db_url, "--json", "task", "list", "--base", base),
                            capture_output=True, text=True, env=_env(), timeout=COMMAND_TIMEOUT,
                           check=False)
    rows = json.loads(listed.stdout) if listed.returncode == 0 else []
    if listed.returncode != 0:
        failures.append(f"task list: exit {listed.returncode}: {_first_line(listed.stderr)}")
    ready = [row for row in rows if row["name"] in names and row["status"] == "ready"]
    check = subprocess.run(
        taps_cl(home, db_url, "--json", "report", "accuracy", "--base", base, "--verify"),
        capture_output=True, text=True, env=_env(), timeout=COMMAND_TIMEOUT, check=False)
    lock_errors += bool(LOCK_ERROR.search(check.stdout + check.stderr))
    try:
        report = json.loads(check.stdout)
    except ValueError:
        report = {}
    verified = (check.returncode == 0 and report.get("verified") is True
                and report.get("tasks") == [row["name"] for row in ready]
                and len(ready) == writers)
    if not verified:
        why = _first_line(check.stderr) if check.stderr.strip() else report.get("problems")
        failures.append(f"report accuracy --verify: exit {check.returncode}: {why}")
    return Round(
        repetition=repetition, base=base, writers=writers, landed=len(ready),
        positions=tuple(sorted(row["position"] for row in ready)), lock_errors=lock_errors,
        reads=reads, read_failures=read_failures, verified=verified, failures=tuple(failures),
        seconds=round(time.perf_counter() - started, 1),
    )


def _describe(result: Round) -> str:
    positions = ",".join(map(str, result.positions)) or "-"
    line = (f"repetition {result.repetition}: landed {result.landed}/{result.writers} "
            f"(positions {positions}), lock errors {result.lock_errors}, reads {result.reads} "
            f"({result.read_failures} failed), verified {'yes' if result.verified else 'NO'} "
            f"[{result.seconds:.0f} s]")
    return "\n".join([line, *(f"  failed: {failure}" for failure in result.failures)])


def _start_postgres():  # type: ignore[no-untyped-def]
    """A throwaway server from the tests' launcher (tests/pgserver.py)."""
    # The launcher is test infrastructure, not part of the installed packages: it is imported
    # from the source checkout this benchmark runs in, whose root is not on sys.path when the
    # script is run as `python benchmarks/team.py` (only benchmarks/ is).
    root = str(REPO_ROOT)
    if root not in sys.path:
        sys.path.insert(0, root)
    from tests.pgserver import start_postgres

    return start_postgres()


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", default="sqlite",
                        help="sqlite (a temp file), postgres (a server started here) or a URL")
    parser.add_argument("--repeats", type=int, default=5, help="repetitions (default 5)")
    parser.add_argument("--writers", type=int, default=4, help="concurrent `task add` (4)")
    parser.add_argument("--epochs", type=int, default=1, help="epochs per task (1)")
    parser.add_argument("--data", type=Path, help="an image folder (default: generated)")
    parser.add_argument("--work", type=Path, help="directory for the home and data (kept)")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.writers < 1 or args.epochs < 1:
        parser.error("--repeats, --writers and --epochs must be at least 1")

    work = args.work or Path(tempfile.mkdtemp(prefix="taps-cl-team-"))
    server = None
    try:
        data = args.data or make_images(work / "data")
        db_url: Optional[str] = None
        if args.db == "postgres":
            server = _start_postgres()
            db_url = server.create_database("team")
        elif args.db != "sqlite":
            db_url = args.db
        tag = secrets.token_hex(3)  # fresh base and task names on a registry used before
        results = []
        for repetition in range(1, args.repeats + 1):
            result = run_round(repetition, work / "home", db_url, data,
                               writers=args.writers, epochs=args.epochs, tag=tag)
            results.append(result)
            if not args.json:
                print(_describe(result), flush=True)
        total = {
            "backend": "sqlite" if db_url is None else db_url.split(":", 1)[0],
            "repetitions": len(results),
            "all_landed": sum(r.landed == r.writers for r in results),
            "landed": sum(r.landed for r in results),
            "writers": sum(r.writers for r in results),
            "lock_errors": sum(r.lock_errors for r in results),
            "reads": sum(r.reads for r in results),
            "read_failures": sum(r.read_failures for r in results),
            "verified": sum(r.verified for r in results),
            "ok": all(r.ok for r in results),
        }
        if args.json:
            print(json.dumps({"rounds": [{**asdict(r), "ok": r.ok} for r in results],
                              "total": total}))
        else:
            print(f"total ({total['backend']}): {total['all_landed']}/{total['repetitions']} "
                  f"repetitions landed every task ({total['landed']}/{total['writers']} tasks), "
                  f"lock errors {total['lock_errors']}, reads {total['reads']} "
                  f"({total['read_failures']} failed), verified "
                  f"{total['verified']}/{total['repetitions']}")
        return 0 if total["ok"] else 1
    finally:
        if server is not None:
            server.stop()
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
