"""What tests/test_distributed.py runs under torchrun: `python distributed_entry.py MODE ARGS…`.

* `fail-before ARGS…` / `fail-after ARGS…`: the CLI with ARGS, where rank 1 (only) fails as its
  training starts / once its training is done — `taps_cl.tasks.adding.fit` is wrapped here, the
  library has no test hook.
* `fit OUT [METHOD]`: `train.fit` on a tiny model in the torchrun group (METHOD: taps); each
  rank writes the training indices it read, its history and its final state to OUT.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.utils.data import Dataset

INJECTED = "injected failure on rank 1"


def run_cli(mode: str, args: list[str]) -> None:
    import taps_cl.tasks.adding as adding
    from taps_cl.cli.app import main
    from taps_cl.errors import TapsError

    real_fit = adding.fit
    failing = os.environ["RANK"] == "1"

    def fit(*pos, **kw):  # type: ignore[no-untyped-def]
        if failing and mode == "fail-before":
            raise TapsError(INJECTED)
        result = real_fit(*pos, **kw)
        if failing:
            raise TapsError(INJECTED)
        return result

    adding.fit = fit
    main(args)


class Recorded(Dataset):
    """Random images of 3 learnable classes that remember which index was read, in order."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(n) % 3
        self.images = torch.randn(n, 3, 32, 32, generator=g) + self.labels.view(-1, 1, 1, 1)
        self.read: list[int] = []

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):  # type: ignore[no-untyped-def]
        self.read.append(int(i))
        return self.images[i], int(self.labels[i])


def run_fit(out: Path, method_name: str = "taps") -> None:
    from taps_cl.methods.catalog import get_method
    from taps_cl.models import backbones
    from taps_cl.training.distributed import joined
    from taps_cl.training.fit import TrainConfig, fit

    spec = backbones.ModelSpec.parse("timm:test_resnet")
    head = frozenset(backbones.head_keys(spec))
    train, val = Recorded(24, seed=1), Recorded(10, seed=2)
    with joined("cpu") as (group, device):
        torch.manual_seed(0)
        model = backbones.create_model(spec, pretrained=False)
        model.reset_classifier(3)
        method = get_method(method_name)
        model = method.prepare(model, head)
        cfg = TrainConfig(epochs=2, batch_size=8, device=device, seed=5,
                          processes=group.world_size)
        result = fit(model, method, train, val, cfg, group=group)
        rank = group.rank
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / f"rank{rank}.safetensors"))
    (out / f"rank{rank}.json").write_text(json.dumps(
        {"read": train.read, "history": result.history, "best_epoch": result.best_epoch,
         "world_size": group.world_size}))


if __name__ == "__main__":
    mode, rest = sys.argv[1], sys.argv[2:]
    if mode == "fit":
        run_fit(Path(rest[0]), *rest[1:])
    else:
        run_cli(mode, rest)
