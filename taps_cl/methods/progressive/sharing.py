"""Shared artifacts of progressive adaptation: their format, and the groups a base's tasks form.

A shared artifact holds one band of progressive adapters (`Progressive.band_tensors`: `module/`
adapters and `set/` norm layers) with metadata naming the band, the group (for a group band), the
band options (`ProgressiveConfig.bands_key`) and the base. Tasks pin it by sha256 with the pin
kind of its band (`PIN_KINDS`). That kind is a copy in an editable row: what a pin means — which
band it is — is read from the artifact's own metadata (`band_of`), never from the row. Nothing
here touches the registry: the task layer hands in earlier tasks and bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, Optional

from torch import Tensor, nn

import taps_cl.serialization as serialization
from taps_cl.errors import TapsError
from taps_cl.methods.base import Dependency, EarlierTask, SharedWrite

# The ModuleDict attribute holding a progressive task's adapters on the model.
PROGRESSIVE_ATTR = "taps_progressive"
# The bands of blocks, from the input: shared by all tasks, by a similarity group, the task's own.
BANDS = ("shared", "group", "task")
# The options every task reading the same shared artifacts must agree on.
BAND_KEYS = ("reduction", "activation", "shared_fraction", "task_fraction")
# task_dependencies.kind of a pin on a shared artifact, by band.
PIN_KINDS = {"shared": "progressive_shared", "group": "progressive_group"}
BANDS_OF_PINS = {kind: band for band, kind in PIN_KINDS.items()}


def band_blob(config: Any, band: str, group: str, tensors: dict[str, Tensor],
              base_sha256: str) -> bytes:
    """The bytes of a shared artifact holding one band (`group` means something for "group"
    only)."""
    if band not in PIN_KINDS:
        raise TapsError(f"no shared band {band!r} (shared bands: {', '.join(PIN_KINDS)})")
    meta = {"kind": "shared", "method": "progressive", "band": band,
            "group": group if band == "group" else "", "base_sha256": base_sha256,
            "config": config.bands_key()}
    return serialization.to_bytes(tensors, meta)


def _band_meta(blob: bytes) -> dict[str, Any]:
    meta = serialization.metadata_from_bytes(blob)
    if meta.get("method") != "progressive" or meta.get("band") not in PIN_KINDS:
        raise TapsError("artifact is not a shared band of progressive adapters")
    return meta


def band_of(blob: bytes) -> str:
    """The band ("shared" or "group") a shared artifact holds, by its own metadata."""
    return str(_band_meta(blob)["band"])


def band_dependency(blob: bytes) -> Dependency:
    """A shared artifact as the Dependency a progressive task reads (tensors included); its
    `kind` is the pin kind of the band the artifact's metadata names."""
    meta = _band_meta(blob)
    config = serialization.json_field(meta, "config") or {}
    return Dependency(dependency_name(meta["band"], meta.get("group", "")), "progressive",
                      {**config, "band": meta["band"], "group": meta.get("group", "")},
                      serialization.from_bytes(blob), kind=PIN_KINDS[meta["band"]])


def dependency_name(band: str, group: str) -> str:
    """How a shared band is named in dependency lists and exported files."""
    return "shared band" if band == "shared" else f"group {group}"


# `--group` values that are not group names (a group opened by a task so named is renamed).
GROUP_WORDS = ("auto", "new")


def new_group_name(task: str, taken: Collection[str]) -> str:
    """The name of a group task `task` opens: its own, else `task-2`, `task-3`, …

    A group outlives the task that opened it while other members remain, so a later task of the
    same name must not open a second group under that name: `sharing_of` would merge the two.
    """
    reserved = set(taken) | set(GROUP_WORDS)
    if task not in reserved:
        return task
    k = 2
    while f"{task}-{k}" in reserved:
        k += 1
    return f"{task}-{k}"


@dataclass(frozen=True)
class SimilarityGroup:
    """A similarity group of progressive tasks on one base."""

    name: str
    group_sha256: str  # the group band's shared artifact
    members: tuple[str, ...]  # its ready tasks, in sequence order


@dataclass(frozen=True)
class Sharing:
    """What a base's progressive tasks share: the shared band, its options, the groups."""

    shared_sha256: Optional[str]  # the base's shared band (None before its first progressive task)
    config: Optional[dict[str, Any]]  # the band options of its first progressive task
    groups: dict[str, SimilarityGroup]

    def band_options(self, base: str, options: dict[str, Any]) -> dict[str, Any]:
        """`options` with the base's band options; TapsError where they contradict them."""
        theirs = self.config or {}
        clash = {k: v for k, v in options.items() if k in theirs and v != theirs[k]}
        if clash:
            raise TapsError(f"progressive: base {base!r} shares its bands with options "
                            f"{theirs}; {clash} disagree")
        return {**options, **theirs}


def sharing_of(tasks: Sequence[EarlierTask],
               read: Optional[Callable[[str], bytes]] = None) -> Sharing:
    """The shared band and groups of a base's ready tasks (in sequence order).

    The shared band is the one the first progressive task pins. Tasks that pin another one (two
    first tasks trained at once) are left out of the groups: their group bands were trained on
    top of that other band, and a task joining them must read the band they were made with.

    With `read` (hash-checked bytes by sha256, `Planning.read`) each pin's band is the one its
    artifact's metadata names, whatever kind its row was given; without, the rows' kinds are
    taken as they are, and a plan built on an edited one is refused when it is turned into a
    `SharedRead` (which checks the kind against the artifact).
    """
    bands = _bands_by_artifact(read)
    shared, config = None, None
    members: dict[str, list[str]] = {}
    group_sha: dict[str, str] = {}
    for task in tasks:
        if task.method != "progressive":
            continue
        pins = {bands(kind, sha256): sha256 for kind, sha256 in task.pins}
        if shared is None and pins.get("shared"):
            shared = pins["shared"]
            config = {key: task.config[key] for key in BAND_KEYS}
        group = task.config.get("group", "")
        if group and pins.get("group") and pins.get("shared") == shared:
            group_sha.setdefault(group, pins["group"])
            members.setdefault(group, []).append(task.name)
    groups = {name: SimilarityGroup(name, group_sha[name], tuple(names))
              for name, names in members.items()}
    return Sharing(shared, config, groups)


def _bands_by_artifact(
    read: Optional[Callable[[str], bytes]],
) -> Callable[[str, str], Optional[str]]:
    """(pin kind, sha256) → band: the artifact's (read once each) with `read`, else the kind's."""
    if read is None:
        return lambda kind, sha256: BANDS_OF_PINS.get(kind)
    known: dict[str, str] = {}

    def band(kind: str, sha256: str) -> Optional[str]:
        if sha256 not in known:
            known[sha256] = band_of(read(sha256))
        return known[sha256]

    return band


def trained_band(learner: Any, model: nn.Module, band: str, base_sha256: str) -> SharedWrite:
    """A band a progressive task trained (`learner`, its Progressive method), as a new shared
    artifact and as the dependency its stored model reads."""
    config = learner.config
    blob = band_blob(config, band, config.group, learner.band_tensors(model, band), base_sha256)
    tensors = serialization.from_bytes(blob)
    return SharedWrite(blob, PIN_KINDS[band], serialization.numel(tensors), band_dependency(blob))
