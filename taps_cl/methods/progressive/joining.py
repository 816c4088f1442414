"""Progressive tasks that join a base's sharing (DESIGN §5b): signatures, group choice, bands.

`Joining` computes a new task's gradient signature (stored with every task) and decides, from
the base's shared artifacts (`sharing.sharing_of`) and the stored signatures of each group's
members, which shared bands a new progressive task reads frozen and which it trains itself.
`trained_band` turns a band a task trained into a new shared artifact. Nothing here writes to
the registry: `TaskAdder` and `GroupTrainer` record what it decides.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from registry import Registry
from registry.entities import Artifact, BaseModel, SharedPin
from taps_cl import serialization
from taps_cl.analysis import similarity
from taps_cl.data import specs as data
from taps_cl.errors import TapsError
from taps_cl.methods.base import Dependency, Method
from taps_cl.methods.progressive.method import BANDS
from taps_cl.methods.progressive.sharing import (
    PIN_KINDS,
    Sharing,
    band_blob,
    band_dependency,
    new_group_name,
    sharing_of,
)
from taps_cl.models import backbones
from taps_cl.tasks.rebuilding import TaskModels, example_input
from taps_cl.tasks.verification import sha256_of

log = logging.getLogger(__name__)

# A progressive task joins the group whose members' signatures it matches best on average, when
# that mean cosine similarity reaches this; below it opens a group of its own.
JOIN_THRESHOLD = similarity.DEFAULT_THRESHOLD  # the threshold `group train` clusters with


@dataclass
class SharedBands:
    """The shared bands a progressive task reads frozen, and what it trains into new ones."""

    group: str  # the task's group
    frozen: list[tuple[Dependency, str, str]]  # (band as a dependency, its sha256, band name)
    trained: tuple[str, ...]  # shared bands it trains (stored as new shared artifacts)
    # Mean similarity to each existing group (with --group auto), for the log and the result.
    similarity: dict[str, float]

    @property
    def dependencies(self) -> list[Dependency]:
        return [dep for dep, _, _ in self.frozen]

    def pins(self) -> list[SharedPin]:
        return [SharedPin(sha, PIN_KINDS[band]) for _, sha, band in self.frozen]


class Joining:
    """Signatures and shared-band plans of new tasks on one registry (reads only)."""

    def __init__(self, registry: Registry, models: TaskModels) -> None:
        self.registry = registry
        self.models = models

    def signature(self, base: BaseModel, task_data: data.TaskData, img_size: Optional[int],
                  name: str) -> Optional[tuple[torch.Tensor, bytes]]:
        """The task's gradient signature (taps_cl.analysis.similarity) and its artifact's bytes; None
        for a one-class task (its loss has no gradient to compare).

        Computed on the CPU in float32 from a fresh copy of the base, so that signatures of
        tasks added on different machines compare.
        """
        if len(task_data.class_names) < 2:
            return None
        model = backbones.build_task_model(
            backbones.ModelSpec.parse(base.model_spec), self.models.base_state(base),
            len(task_data.class_names), frozenset(base.head_keys),
        )
        signature = similarity.task_signature(
            model, frozenset(base.head_keys), task_data.train,
            example=example_input(base.data_config, img_size),
        )
        meta = {**similarity.signature_meta(model), "task": name, "base_sha256": base.sha256}
        return signature, similarity.signature_to_bytes(signature, meta)

    def plan(self, base: BaseModel, learner: Method,
             signature: Optional[tuple[torch.Tensor, bytes]], *, name: str,
             group: Optional[str], options: dict[str, Any],
             join_threshold: float = JOIN_THRESHOLD) -> tuple[Method, SharedBands]:
        """Which shared bands a new progressive task reads and which it trains (DESIGN §5b).

        The base's first progressive task trains all three bands. Later ones read the base's
        shared band; with `--group auto` they join the group whose members' signatures they
        match best (mean cosine ≥ `join_threshold`), else open a group of their own (named after
        the task, `sharing.new_group_name`) and train its group band. `group` is "auto" (None),
        "new" or a group's name. Band options come from the base's shared band.
        """
        tasks = self.registry.list_tasks(base.name, ready_only=True, method="progressive",
                                         layers=False)
        sharing = sharing_of(tasks)
        choice = group or "auto"
        if sharing.shared_sha256 is None:
            if choice not in ("auto", "new"):
                raise TapsError(f"there is no group {choice!r}: base {base.name!r} has no "
                                "progressive task yet (use --group auto or new)")
            group = new_group_name(name, ())
            config = dataclasses.replace(learner.config, group=group, train_bands=BANDS)
            return (type(learner)(config), SharedBands(group, [], ("shared", "group"), {}))
        assert sharing.config is not None
        sharing.band_options(base.name, options)
        shared = self.shared_band(sharing.shared_sha256)
        signatures = {task.name: task.signature for task in tasks}
        scores = (self._group_similarity(sharing, signatures, *signature)
                  if choice == "auto" and signature is not None else {})
        if choice == "auto":
            best = max(scores, key=scores.__getitem__, default=None)
            group = best if best is not None and scores[best] >= join_threshold else None
            log.info("progressive: mean similarity to groups %s; %s", scores,
                     f"joining {group}" if group else "opening a new group")
        elif choice == "new":
            group = None
        elif choice in sharing.groups:
            group = choice
        else:
            raise TapsError(f"there is no group {choice!r} on base {base.name!r} (groups: "
                            f"{', '.join(sharing.groups) or 'none'})")
        frozen = [(shared, sharing.shared_sha256, "shared")]
        if group is None:
            trained: tuple[str, ...] = ("group",)
            group = new_group_name(name, sharing.groups)
        else:
            sha = sharing.groups[group].group_sha256
            frozen.append((self.shared_band(sha), sha, "group"))
            trained = ()
        config = dataclasses.replace(learner.config, **sharing.config, group=group,
                                     train_bands=(*trained, "task"))
        return type(learner)(config), SharedBands(group, frozen, trained, scores)

    def shared_band(self, sha256: str) -> Dependency:
        return band_dependency(self.registry.read_artifact(self.registry.get_artifact(sha256)))

    def _group_similarity(self, sharing: Sharing, stored: dict[str, Optional[Artifact]],
                          signature: torch.Tensor, blob: bytes) -> dict[str, float]:
        """Mean cosine similarity of `signature` to the stored signatures (`stored`, by task) of
        each group's members (members without one, or with one of another recipe, do not
        count)."""
        recipe = similarity.signature_recipe(blob)
        scores = {}
        for name, group in sharing.groups.items():
            sims = []
            for member in group.members:
                artifact = stored.get(member)
                if artifact is None:
                    continue
                theirs = self.registry.read_artifact(artifact)
                if similarity.signature_recipe(theirs) != recipe:
                    continue
                sims.append(float(similarity.cosine_matrix(
                    [signature, similarity.signature_from_bytes(theirs)])[0, 1]))
            if sims:
                scores[name] = sum(sims) / len(sims)
        return scores


def trained_band(learner: Method, model: nn.Module, band: str,
                 base: BaseModel) -> tuple[SharedPin, Dependency]:
    """A band a progressive task trained, as a new shared artifact (pin with its bytes) and as
    the dependency its stored model reads."""
    config = learner.config
    blob = band_blob(config, band, config.group, learner.band_tensors(model, band), base.sha256)
    tensors = serialization.from_bytes(blob)
    pin = SharedPin(sha256_of(blob), PIN_KINDS[band], blob, serialization.numel(tensors))
    return pin, band_dependency(blob)
