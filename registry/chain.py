"""The hash chain of a base's task sequence: what proves an add left earlier tasks alone.

Each ready task records ``chain = H(prev, position, name, task sha256, probe sha256[, signature
sha256])`` (the signature term only for tasks that have one, so older links keep their value), where
``prev`` is the chain of the ready task it followed when it finished (the genesis value of the
base for the first). An add writes only its own rows, and artifacts are content-addressed and
never rewritten, so every earlier task's artifacts are pinned by every later chain: changing an
earlier task's artifact rows breaks its own link, and rewriting its chain too breaks the next
task's ``prev``. Checking the chain reads rows only — no model is rebuilt.

The formula is part of the database contract: every recorded chain value was computed with it,
and migrations compute it with this module (revision 0004 links the tasks it finds ready), so
it must never change. docs/architecture.md ("How a task is added") describes the chain.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional


def genesis(base_sha256: str) -> str:
    """The chain value before a base's first task."""
    return hashlib.sha256(f"taps-cl chain v1\nbase {base_sha256}".encode()).hexdigest()


def link(prev: str, position: int, name: str, task_sha256: str, probe_sha256: str,
         signature_sha256: Optional[str] = None) -> str:
    """The chain value of a task that followed `prev`."""
    text = f"{prev}\n{position}\n{name}\n{task_sha256}\n{probe_sha256}"
    if signature_sha256 is not None:
        text += f"\nsignature {signature_sha256}"
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class ChainEntry:
    """The rows of one ready task that its chain covers, in position order."""

    name: str
    position: int
    task_sha256: Optional[str]
    probe_sha256: Optional[str]
    chain_prev: Optional[str]
    chain: Optional[str]
    signature_sha256: Optional[str] = None


def chain_problems(base_sha256: str, entries: Sequence[ChainEntry]) -> dict[str, str]:
    """Task name → what is wrong with its link, for a base's ready tasks in position order.

    A task's ``prev`` must be the chain of the ready task just before it. Where positions skip
    (`task delete` removed the task in between), that predecessor is gone and only the task's
    own link is checked.
    """
    problems: dict[str, str] = {}
    expected_prev, last_position = genesis(base_sha256), 0
    for entry in entries:
        gap = entry.position != last_position + 1
        last_position = entry.position
        if entry.chain is None or entry.chain_prev is None:
            problems[entry.name] = "has no chain value (its row was altered)"
        elif entry.task_sha256 is None or entry.probe_sha256 is None:
            problems[entry.name] = "has no artifacts"
        elif link(entry.chain_prev, entry.position, entry.name, entry.task_sha256,
                  entry.probe_sha256, entry.signature_sha256) != entry.chain:
            problems[entry.name] = ("its chain value does not match its position, name or "
                                    "artifacts (its rows were altered after it was added)")
        elif entry.chain_prev != expected_prev and not gap:
            problems[entry.name] = ("its chain does not follow the task before it (an earlier "
                                    "task's rows were altered after this task was added)")
        expected_prev = entry.chain if entry.chain is not None else expected_prev
    return problems
