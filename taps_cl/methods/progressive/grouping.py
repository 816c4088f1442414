"""Several new progressive tasks trained together: their groups and their tied models.

The tasks' signatures are clustered into groups (`--groups K`, or by the similarity threshold); each
group is named after its first member. One model per task is built on the frozen base; their
shared-band adapters and norm layers are the same modules, and so are the group-band ones of the
members of a group (a base that already has a shared band gives it frozen to every member
instead). The task layer trains them with the one training loop and stores each band once.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import nn

from taps_cl.methods.base import GroupPlan, GroupPlanning, Method, SharedRead
from taps_cl.methods.blocks import site_key
from taps_cl.methods.progressive.sharing import (
    BANDS,
    PIN_KINDS,
    PROGRESSIVE_ATTR,
    band_dependency,
    new_group_name,
    sharing_of,
)

log = logging.getLogger(__name__)


def plan_group(learner: Any, planning: GroupPlanning) -> GroupPlan:
    """Groups, configured methods and tied models of the new tasks (see the module docstring)."""
    names = list(planning.names)
    context = planning.planning
    sharing = sharing_of(context.earlier(learner.name), context.read)
    groups: dict[str, list[str]] = {}
    group_of = {}
    named: dict[Any, str] = {}  # cluster label → group name (its first member's, if free)
    for name, label in zip(names, planning.labels):
        if label not in named:
            named[label] = new_group_name(name, [*sharing.groups, *named.values()])
        groups.setdefault(named[label], []).append(name)
        group_of[name] = named[label]
    log.info("group train: groups %s", groups)
    config = learner.config
    reads: list[SharedRead] = []
    if sharing.shared_sha256 is not None:
        options = sharing.band_options(context.base, dict(context.given))
        config = dataclasses.replace(config, **{k: options[k] for k in sharing.config or {}})
        reads.append(SharedRead(band_dependency(context.read(sharing.shared_sha256)),
                                sharing.shared_sha256, PIN_KINDS["shared"]))
    trained = ("group", "task") if reads else BANDS
    methods = [type(learner)(dataclasses.replace(config, group=group_of[name],
                                                 train_bands=trained)) for name in names]
    models = tied_models(methods, planning, reads[0].dependency if reads else None)
    return GroupPlan(methods, models, reads, groups,
                     [[float(v) for v in row] for row in planning.matrix])


def tied_models(methods: Sequence[Method], planning: GroupPlanning,
                frozen_shared: Optional[Any]) -> list[nn.Module]:
    """One model per task, the shared band's modules common to all, a group's to its members."""
    torch.manual_seed(planning.seed)
    models: list[nn.Module] = []
    owners: dict[str, nn.Module] = {}  # band owner per group ("" for the shared band)
    for learner, classes in zip(methods, planning.class_counts):
        model = planning.build(classes)
        head = planning.head
        config: Any = learner.config
        deps = [frozen_shared] if frozen_shared else []
        shared_owner = owners.get("")
        group_owner = owners.get(config.group)
        given = {}
        if shared_owner is not None or group_owner is not None:
            blocks, _ = learner.bands(shared_owner or group_owner)  # type: ignore[attr-defined]
            for block, band in blocks.items():
                owner = {"shared": shared_owner, "group": group_owner}.get(band)
                if owner is not None:
                    given[site_key(block)] = getattr(owner, PROGRESSIVE_ATTR)[site_key(block)]
        learner.attach(model, head, deps, planning.example, modules=given)  # type: ignore[call-arg]
        if frozen_shared is not None:
            placed = learner.dependency_state(frozen_shared)
            model.load_state_dict({**model.state_dict(), **placed}, strict=True)
        _, norms = learner.bands(model)  # type: ignore[attr-defined]
        for norm, band in norms.items():
            owner = {"shared": shared_owner, "group": group_owner}.get(band)
            if owner is not None:
                model.set_submodule(norm, owner.get_submodule(norm))
        learner.prepare(model, head)
        owners.setdefault("", model)
        owners.setdefault(config.group, model)
        models.append(model)
    return models
