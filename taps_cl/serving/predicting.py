"""`taps-cl predict --task A,B` / `--all`: several tasks' predictions in one shared pass.

The images are read and preprocessed as `taps-cl predict NAME` reads them (once per distinct
preprocessing among the tasks), and run through one multi-task model (`multitask.py`): the stages
the tasks share run once per image.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch

from taps_cl.errors import TapsError
from registry.entities import BaseModel
from taps_cl.serving.multitask import Manager as Registered
from taps_cl.serving.multitask import build_multitask
from taps_cl.training.device import resolve_device


class Manager(Registered):
    """What predicting reads of a `taps_cl.Manager`: the multi-task model's needs and the base."""

    def only_base(self, base: Optional[str] = None) -> BaseModel: ...

# Images preprocessed and run at once; more are taken in chunks of this many.
CHUNK = 64

Prediction = dict[str, list[tuple[str, float]]]


def ready_tasks(manager: Manager, base: Optional[str]) -> list[str]:
    """Every ready task of `base` (None: of the only base; TapsError naming them if several)."""
    chosen = manager.only_base(base)
    names = [t.name for t in manager.list_tasks(chosen.name) if t.status == "ready"]
    if not names:
        raise TapsError(f"base {chosen.name!r} has no ready task")
    return names


def predict_many(manager: Manager, images: Sequence[str], tasks: Optional[Sequence[str]] = None,
                 base: Optional[str] = None, top_k: int = 3,
                 device: str = "auto") -> list[Prediction]:
    """Per image file, each task's top-k (class name, probability), in the order of `tasks`.

    `tasks` None: every ready task of `base` (see `ready_tasks`).
    """
    names = list(dict.fromkeys(tasks)) if tasks is not None else ready_tasks(manager, base)
    if not names:
        raise TapsError("name at least one task")
    model = build_multitask(manager, names, device=str(resolve_device(device)))
    served = model.tasks
    out: list[Prediction] = [{} for _ in images]
    for group in model.same_preprocessing(names):
        for start in range(0, len(images), CHUNK):
            paths = images[start:start + CHUNK]
            batch = torch.stack([model.load_image(group[0], p) for p in paths])
            for row, logits in enumerate(model(batch, [group] * len(paths))):
                for name, values in logits.items():
                    probs = torch.softmax(values, dim=0)
                    k = min(top_k, len(served[name].classes))
                    top, index = probs.topk(k)
                    out[start + row][name] = [(served[name].classes[i], float(v))
                                              for v, i in zip(top.tolist(), index.tolist())]
    return [{name: found[name] for name in names} for found in out]
