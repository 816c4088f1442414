"""A backbone's forward pass as an ordered list of stages: where several tasks can share work.

A stage is a piece of the forward pass run on the previous stage's output: one module (a block,
a stem convolution), a few parameter-free modules in a row, or the head. What a stage computes is
defined by the modules it names (`Stage.modules`, paths in the model) and, for the head, by the
model's own attributes; the multi-task model compares those between tasks
(`taps_cl/serving/identity.py`) and runs a stage once for all tasks whose stage is the same.

Known families (by class): timm's EfficientNet (Lite0, timm's `test_efficientnet`: stem conv,
stem norm, every block, head conv, head norm, head), timm's ResNet and torchvision's ResNet (stem
conv, stem norm + activation + pool, every residual block, head) and timm's VisionTransformer
(embedding, every block, final norm, head). Any other architecture is one stage, the whole model
(`whole`): still correct, it only shares nothing. `decompose` checks that the stages of a
given model reproduce its forward pass on an example batch and falls back to `whole` when they
do not, or when a hook sits where no stage would run it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

# Largest |difference| between the staged and the whole forward pass that still counts as the
# same computation, relative to the largest |output| (the same float32 ops in the same order
# normally agree exactly; this only absorbs a kernel choosing another summation order).
STAGED_RTOL = 1e-6

Runner = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class Stage:
    """One piece of a backbone's forward pass (see the module docstring)."""

    name: str  # shown in plans: a module path, or a word for a composite stage ("head")
    modules: tuple[str, ...]  # module paths (in the model) whose content defines the stage
    head: bool = False  # the classifier head: its function also depends on the model's attributes
    # Builds the function running this stage with a given model's modules (looked up once).
    binder: Callable[[nn.Module], Runner] = field(default=None, repr=False,  # type: ignore[assignment]
                                                   compare=False)

    def bind(self, model: nn.Module) -> Runner:
        """This stage as a function of its input, computed with `model`'s modules."""
        return self.binder(model)


@dataclass(frozen=True)
class Decomposition:
    """A model's stages, and which family gave them ("whole" when none applies)."""

    family: str
    stages: tuple[Stage, ...]

    @property
    def staged(self) -> bool:
        return self.family != "whole"


def _chain(name: str, paths: Sequence[str]) -> Stage:
    def binder(model: nn.Module) -> Runner:
        mods = [model.get_submodule(p) for p in paths]

        def run(x: Tensor) -> Tensor:
            for module in mods:
                x = module(x)
            return x
        return run
    return Stage(name, tuple(paths), binder=binder)


def _head(paths: Sequence[str], call: Callable[[nn.Module, Tensor], Tensor]) -> Stage:
    def binder(model: nn.Module) -> Runner:
        return lambda x: call(model, x)
    return Stage("head", tuple(paths), head=True, binder=binder)


def _blocks(model: nn.Module, parents: Sequence[str]) -> list[Stage]:
    """A stage per child of each Sequential in `parents` (the residual/inverted blocks)."""
    out = []
    for parent in parents:
        for child, _ in model.get_submodule(parent).named_children():
            out.append(_chain(f"{parent}.{child}", [f"{parent}.{child}"]))
    return out


def _rest(model: nn.Module, used: Sequence[str]) -> list[str]:
    """Direct children of `model` that no earlier stage names: what its head uses."""
    taken = {p.split(".")[0] for p in used}
    return [name for name, _ in model.named_children() if name not in taken]


def _timm_efficientnet(model: nn.Module) -> list[Stage]:
    stages = [_chain("conv_stem", ["conv_stem"]), _chain("bn1", ["bn1"])]
    stages += _blocks(model, [f"blocks.{name}" for name, _ in model.blocks.named_children()])
    stages += [_chain("conv_head", ["conv_head"]), _chain("bn2", ["bn2"])]
    used = [p for s in stages for p in s.modules]
    return stages + [_head(_rest(model, used), lambda m, x: m.forward_head(x))]


def _timm_resnet(model: nn.Module) -> list[Stage]:
    stages = [_chain("conv1", ["conv1"]), _chain("bn1", ["bn1", "act1", "maxpool"])]
    stages += _blocks(model, ["layer1", "layer2", "layer3", "layer4"])
    used = [p for s in stages for p in s.modules]
    return stages + [_head(_rest(model, used), lambda m, x: m.forward_head(x))]


def _torchvision_resnet(model: nn.Module) -> list[Stage]:
    stages = [_chain("conv1", ["conv1"]), _chain("bn1", ["bn1", "relu", "maxpool"])]
    stages += _blocks(model, ["layer1", "layer2", "layer3", "layer4"])
    used = [p for s in stages for p in s.modules]
    return stages + [_head(_rest(model, used),
                           lambda m, x: m.fc(torch.flatten(m.avgpool(x), 1)))]


def _timm_vit(model: nn.Module) -> list[Stage]:
    parts = ["patch_embed", "pos_drop", "patch_drop", "norm_pre"]

    def embed(m: nn.Module) -> Runner:
        return lambda x: m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))

    stages = [Stage("embed", tuple(parts), binder=embed)]
    stages += _blocks(model, ["blocks"]) + [_chain("norm", ["norm"])]
    used = [p for s in stages for p in s.modules]
    return stages + [_head(_rest(model, used), lambda m, x: m.forward_head(x))]


def _family(model: nn.Module) -> tuple[str, Callable[[nn.Module], list[Stage]]] | None:
    try:
        from timm.models.efficientnet import EfficientNet
        from timm.models.resnet import ResNet as TimmResNet
        from timm.models.vision_transformer import VisionTransformer
    except ImportError:  # pragma: no cover - timm is a dependency
        return None
    from torchvision.models import ResNet as TorchvisionResNet

    kinds: list[tuple[type, str, Callable[[nn.Module], list[Stage]]]] = [
        (EfficientNet, "timm EfficientNet", _timm_efficientnet),
        (TimmResNet, "timm ResNet", _timm_resnet),
        (TorchvisionResNet, "torchvision ResNet", _torchvision_resnet),
        (VisionTransformer, "timm VisionTransformer", _timm_vit),
    ]
    for cls, name, build in kinds:
        if type(model) is cls:  # a subclass may change the forward pass
            return name, build
    return None


def whole() -> Decomposition:
    """One stage, the whole model: for architectures without a known decomposition."""
    def binder(model: nn.Module) -> Runner:
        return model
    return Decomposition("whole", (Stage("model", ("",), head=True, binder=binder),))


def _hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def decompose(model: nn.Module, example: Tensor) -> Decomposition:
    """The stages of `model` (in eval mode), checked on `example` against its forward pass."""
    found = _family(model)
    if found is None:
        return whole()
    family, build = found
    try:
        stages = tuple(build(model))
    except (AttributeError, TypeError) as exc:  # a family member laid out otherwise
        log.info("%s: no stage decomposition (%s); running it whole", family, exc)
        return whole()
    covered = [p for s in stages for p in s.modules]
    hooked = [name for name, m in model.named_modules() if _hooks(m)]
    stray = [name for name in hooked
             if not any(name == p or name.startswith(f"{p}.") for p in covered)]
    if stray:  # the root's hooks, or hooks on modules no stage runs, would be lost
        log.info("%s: hooks on %s outside every stage; running it whole", family, stray[:3])
        return whole()
    decomposition = Decomposition(family, stages)
    with torch.no_grad():
        expected = model(example)
        got = example
        for stage in stages:
            got = stage.bind(model)(got)
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    if got.shape != expected.shape or float((got - expected).abs().max()) > STAGED_RTOL * max(
            scale, 1.0):
        log.info("%s: its stages do not reproduce the model's forward pass; running it whole",
                 family)
        return whole()
    return decomposition
