"""How a new progressive task joins a base's sharing: which shared bands it reads, which it trains.

The base's first progressive task trains all three bands. Later ones read the base's shared band
frozen; with group "auto" they join the group whose members' stored signatures they match best
(mean cosine ≥ `join_threshold`), else they open a group of their own (named after the task,
`sharing.new_group_name`) and train its group band. Band options come from the base's shared band.
Everything is read through the `Planning` the task layer hands in; nothing here writes.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Optional

from taps_cl.errors import TapsError
from taps_cl.methods.base import Method, Plan, Planning, SharedRead
from taps_cl.methods.progressive.sharing import (
    BANDS,
    PIN_KINDS,
    Sharing,
    band_dependency,
    new_group_name,
    sharing_of,
)

log = logging.getLogger(__name__)

# `--group` values that choose rather than name a group (`sharing.GROUP_WORDS`).
AUTO, NEW = "auto", "new"


def plan_join(learner: Method, planning: Planning) -> Plan:
    """The plan of a new progressive task (rule in the module docstring)."""
    config: Any = learner.config
    sharing = sharing_of(planning.earlier(learner.name), planning.read)
    choice = config.group
    if sharing.shared_sha256 is None:
        if choice not in (AUTO, NEW):
            raise TapsError(f"there is no group {choice!r}: base {planning.base!r} has no "
                            "progressive task yet (use --group auto or new)")
        group = new_group_name(planning.task, ())
        return Plan(type(learner)(dataclasses.replace(config, group=group, train_bands=BANDS)))
    assert sharing.config is not None
    sharing.band_options(planning.base, dict(planning.given))
    reads = [_read(planning, sharing.shared_sha256, "shared")]
    scores = (group_similarity(sharing, planning)
              if choice == AUTO and planning.signature is not None else {})
    joined: Optional[str]
    if choice == AUTO:
        best = max(scores, key=scores.__getitem__, default=None)
        joined = best if best is not None and scores[best] >= config.join_threshold else None
        log.info("progressive: mean similarity to groups %s; %s", scores,
                 f"joining {joined}" if joined else "opening a new group")
    elif choice == NEW:
        joined = None
    elif choice in sharing.groups:
        joined = choice
    else:
        raise TapsError(f"there is no group {choice!r} on base {planning.base!r} (groups: "
                        f"{', '.join(sharing.groups) or 'none'})")
    if joined is None:
        trained: tuple[str, ...] = ("group",)
        joined = new_group_name(planning.task, sharing.groups)
    else:
        reads.append(_read(planning, sharing.groups[joined].group_sha256, "group"))
        trained = ()
    configured = dataclasses.replace(config, **sharing.config, group=joined,
                                     train_bands=(*trained, "task"))
    return Plan(type(learner)(configured), reads, {"group": joined, "similarity": scores})


def _read(planning: Planning, sha256: str, band: str) -> SharedRead:
    return SharedRead(band_dependency(planning.read(sha256)), sha256, PIN_KINDS[band])


def group_similarity(sharing: Sharing, planning: Planning) -> dict[str, float]:
    """Mean cosine similarity of the new task's signature to the stored signatures of each
    group's members (members without one, or with one of another recipe, do not count)."""
    stored = {task.name: task.signature for task in planning.earlier(None)}
    scores = {}
    for name, group in sharing.groups.items():
        sims = [s for s in (planning.similarity(stored[m]) for m in group.members
                            if stored.get(m) is not None) if s is not None]
        if sims:
            scores[name] = sum(sims) / len(sims)
    return scores
