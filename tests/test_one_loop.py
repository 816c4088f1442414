"""One training loop: `fit_tied` trains one model or several that share modules, honouring every
method hook; `group train` goes through it."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from taps_cl.manager import Manager
from taps_cl.methods.linear import Linear
from taps_cl.methods.progressive.method import Progressive
from taps_cl.training.fit import Member, TrainConfig, fit, fit_tied
from tests.test_train import CLASSES, TRAIN, VAL, make_dataset, prepared

HEAD = frozenset({"fc.weight", "fc.bias"})


class Counting(Linear):
    """A linear probe that counts the hooks the loop calls and adds a small extra loss."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = {"after_step": 0, "extra_loss": 0, "set_train_mode": 0, "selectable": 0}

    def after_step(self, model: nn.Module, epoch: int) -> None:
        self.calls["after_step"] += 1

    def extra_loss(self, model: nn.Module, epoch: int):  # type: ignore[no-untyped-def]
        self.calls["extra_loss"] += 1
        return 0.0 * sum(p.sum() for p in model.parameters() if p.requires_grad)

    def set_train_mode(self, model: nn.Module) -> None:
        self.calls["set_train_mode"] += 1
        model.train()

    def selectable(self, epoch: int, epochs: int) -> bool:
        self.calls["selectable"] += 1
        return epoch > 0  # the first epoch may not be kept


def tied_pair() -> tuple[list[Member], list[Counting]]:
    """Two models whose heads differ and whose `layer4` is the same module object."""
    methods = [Counting(), Counting()]
    models = []
    for method in methods:
        torch.manual_seed(0)
        models.append(method.prepare(timm.create_model("test_resnet", num_classes=CLASSES), HEAD))
    models[1].layer4 = models[0].layer4
    for p in models[0].layer4.parameters():
        p.requires_grad_(True)  # trained through both members
    members = [Member(models[0], methods[0], TRAIN, VAL),
               Member(models[1], methods[1], make_dataset(16, seed=5), VAL)]
    return members, methods


def test_tied_models_run_every_hook_and_share_their_modules():
    members, methods = tied_pair()
    before = members[0].model.layer4[0].conv1.weight.detach().clone()
    cfg = TrainConfig(epochs=2, batch_size=8, lr=1e-2, device="cpu")
    results = fit_tied(members, cfg)
    steps = 2 * (len(TRAIN) // 8)  # the larger set sets the epoch: 32 images in batches of 8
    for method in methods:
        assert method.calls["after_step"] == steps
        assert method.calls["extra_loss"] == steps
        assert method.calls["set_train_mode"] == 2
    assert [r.best_epoch for r in results] == [1, 1]  # epoch 0 not selectable
    assert all(len(r.history) == 2 for r in results)
    shared = members[0].model.layer4[0].conv1.weight
    assert shared is members[1].model.layer4[0].conv1.weight
    assert not torch.equal(shared, before)  # the shared module trained


def test_one_member_is_plain_fit():
    a, method_a = prepared()
    b, method_b = prepared()
    cfg = TrainConfig(epochs=2, batch_size=8, lr=1e-2, device="cpu")
    single = fit(a, method_a, TRAIN, VAL, cfg)
    (tied,) = fit_tied([Member(b, method_b, TRAIN, VAL)], cfg)
    assert single.best_epoch == tied.best_epoch
    assert [r["train_loss"] for r in single.history] == [r["train_loss"] for r in tied.history]
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(x, y)


def test_group_train_runs_the_method_hooks(tmp_path, image_data, image_data4, monkeypatch):
    """`group train` trains with the same loop as `task add`: a hook of the method runs."""
    calls = []
    original = Progressive.after_step

    def after_step(self, model, epoch):  # type: ignore[no-untyped-def]
        calls.append(epoch)
        return original(self, model, epoch)

    monkeypatch.setattr(Progressive, "after_step", after_step)
    with Manager(tmp_path / "home") as m:
        m.add_base("b", "timm:test_efficientnet")
        result = m.group_train("b", [("x", f"imagefolder:{image_data}"),
                                     ("y", f"imagefolder:{image_data4}")],
                               groups=1, epochs=1, batch_size=16, img_size=32, max_train=32,
                               max_test=16)
    assert [r.task.name for r in result.results] == ["x", "y"]
    assert calls and set(calls) == {0}
    assert len(calls) % 2 == 0  # every step runs the hook of both members


def test_tied_members_refuse_several_processes():
    from taps_cl.errors import MethodError
    from taps_cl.training.distributed import RankGroup

    members, _ = tied_pair()
    fake = RankGroup(rank=0, world_size=2, local_rank=0)
    with pytest.raises(MethodError, match="tied models train in one process"):
        fit_tied(members, TrainConfig(epochs=1, batch_size=8, device="cpu", processes=2), group=fake)
