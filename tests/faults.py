"""What the fault-injection tests share: reading what a command said, and its children reaped."""

from __future__ import annotations

import logging
import re
import subprocess
from collections.abc import Iterator

import pytest

# A log line on stderr (what `logging.basicConfig` writes for taps_cl/registry loggers).
LOG_LINE = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: ")
WARNING_LINE = re.compile(r"^(WARNING|ERROR|CRITICAL) [\w.]+: ", re.MULTILINE)
EXIT_DEADLINE = 180  # seconds for a child to end once signalled, or a short command to run

def told(err: str) -> list[str]:
    """What the command said on stderr: its non-blank lines that are not log lines."""
    return [line for line in err.splitlines() if line.strip() and not LOG_LINE.match(line)]


def assert_one_error(code: int, err: str, pattern: str,
                     caplog: pytest.LogCaptureFixture | None = None) -> None:
    """Exit 1 and one `Error:` line matching `pattern`: no traceback, and no warning either (in
    `err` when the command ran in a child, in `caplog` when it ran here)."""
    assert code == 1, err
    assert "Traceback" not in err, err
    (line,) = told(err)
    assert line.startswith("Error: ") and re.search(pattern, line), err
    assert not WARNING_LINE.search(err), err
    if caplog is not None:  # our loggers only: aiohttp may log a reset connection's task late
        assert not [r.getMessage() for r in caplog.records
                    if r.levelno >= logging.WARNING and r.name.startswith(("taps_cl", "registry"))]


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[str]]]:
    """Child processes of a test: each still running at its end is killed and reaped."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=EXIT_DEADLINE)
