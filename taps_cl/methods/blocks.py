"""The blocks of a backbone and modules hooked onto their outputs: what adapter methods build on.

Blocks (`backbone_blocks`): for a timm model, the modules whose names the "blocks" patterns of
`model.group_matcher(coarse=False)` match whole, except patterns with a fixed ordinal (timm's
`(99999,)` tail entries such as `conv_head|bn2` or `norm`, ConvNeXt's `downsample`); when one
matched module contains another, only the inner one counts. That gives 16 blocks on Lite0 and 12
on ViT-S. For a torchvision model, the modules of the block classes its classification models are
built from (`TORCHVISION_BLOCKS`: ResNet's BasicBlock and Bottleneck, the inverted residuals of
MobileNet, ShuffleNet and MNASNet, EfficientNet's MBConv, ConvNeXt's CNBlock, RegNet's, ViT's,
Swin's, MaxViT's, DenseNet's, SqueezeNet's and Inception's); when one contains another, only the
outer one counts (MaxViT's layer, not the MBConv inside it). A model without such modules (VGG,
AlexNet, a plain Sequential) is refused.

Layout (`trace_blocks`, one forward pass of the example batch in eval mode): a 4-D output
(B, A, H, W) is channels-first with C = A — adapted by 1×1 convolutions — unless its last
dimension differs from A and equals the feature count of the block's last norm layer: then it is
channels-last (NHWC, e.g. Swin) with C = W. Token (B, N, D) and pooled (B, D) outputs are
channels-last too. Channels-last outputs are adapted by Linear layers on the last dimension.

Attached modules live in one ModuleDict on the model (e.g. `model.taps_adapters`), keyed by the
block's module name with "." written as "-" (`blocks.3.1` → `blocks-3-1`; `site_key`), and act
through forward hooks on the blocks: the model keeps its timm/torchvision class and the base's
state-dict keys."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from taps_cl.errors import MethodError
from taps_cl.methods.layers import norm_layers

# Largest reduction: an adapter is max(1, channels // reduction) wide, so past the widest block
# of any backbone (a few thousand channels) every adapter is one channel wide already; a larger
# number means nothing and is refused like any count out of range.
MAX_REDUCTION = 65536
ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU}


# The block classes of torchvision's classification models, by class name (each defined in
# torchvision.models.*), with the models built from them.
TORCHVISION_BLOCKS = frozenset({
    "BasicBlock", "Bottleneck",  # ResNet, ResNeXt, Wide ResNet
    "InvertedResidual",  # MobileNetV2, MobileNetV3, ShuffleNetV2
    "_InvertedResidual",  # MNASNet
    "MBConv", "FusedMBConv",  # EfficientNet, EfficientNetV2
    "CNBlock",  # ConvNeXt
    "ResBottleneckBlock",  # RegNet
    "EncoderBlock",  # ViT
    "SwinTransformerBlock", "SwinTransformerBlockV2",  # Swin, Swin V2
    "MaxVitLayer",  # MaxViT
    "_DenseLayer",  # DenseNet
    "Fire",  # SqueezeNet
    "Inception",  # GoogLeNet
    "InceptionA", "InceptionB", "InceptionC", "InceptionD", "InceptionE",  # Inception v3
})


@dataclass(frozen=True)
class BlockSite:
    """One block of the backbone and the layout of its output."""

    name: str  # module name in the model, e.g. "blocks.3.1"
    channels: int  # C, the size of the dimension adapters act on
    channels_last: bool  # C is the last dimension (tokens, NHWC) rather than dimension 1 (NCHW)
    base_params: int  # parameters of the block in the base

    @property
    def key(self) -> str:
        """The block's key in the ModuleDicts of attached modules."""
        return site_key(self.name)


def site_key(name: str) -> str:
    """A block's module name as a ModuleDict key (which may not hold "."): "-" becomes "~", then
    "." becomes "-" (RegNet's `trunk_output.block1.block1-0` → `trunk_output-block1-block1~0`)."""
    if "~" in name:
        raise MethodError(f"block name {name!r} contains '~', which adapter keys reserve")
    return name.replace("-", "~").replace(".", "-")


def site_name(key: str) -> str:
    """The block's module name of a `site_key`."""
    return key.replace("-", ".").replace("~", "-")


def projection(channels_in: int, channels_out: int, channels_last: bool) -> nn.Module:
    """A per-position linear map: Linear on the last dimension, or a 1×1 conv on dimension 1."""
    if channels_last:
        return nn.Linear(channels_in, channels_out)
    return nn.Conv2d(channels_in, channels_out, kernel_size=1)


class Bottleneck(nn.Module):
    """h ↦ h + up(act(down(h))), the up projection zero at start."""

    def __init__(self, site: BlockSite, reduction: int, activation: str) -> None:
        super().__init__()
        width = max(1, site.channels // reduction)
        self.down = projection(site.channels, width, site.channels_last)
        self.act = ACTIVATIONS[activation]()
        self.up = projection(width, site.channels, site.channels_last)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def delta(self, h: Tensor) -> Tensor:
        """The adapter's output z = up(act(down(h))), without the residual."""
        return self.up(self.act(self.down(h)))

    def forward(self, h: Tensor) -> Tensor:
        return h + self.delta(h)

    def hook(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        """Forward hook on the block: its output adapted.

        A bound method, so `copy.deepcopy` of the model rebinds it to the copied adapter.
        """
        return self(output)


def backbone_blocks(model: nn.Module, head: frozenset[str] = frozenset()) -> list[str]:
    """Module names of the backbone's blocks, in module order (rule in the module docstring)."""
    if type(model).__module__.startswith("torchvision."):
        return _torchvision_blocks(model, head)
    matcher = getattr(model, "group_matcher", None)
    if matcher is None:
        raise MethodError(f"adapters cannot find the blocks of {type(model).__name__}: it is "
                          "neither a timm model with a group_matcher nor a torchvision ResNet")
    try:
        patterns = _block_patterns(matcher(coarse=False))
    except (NotImplementedError, TypeError, KeyError, AttributeError) as exc:
        raise MethodError(f"adapters cannot read the block grouping of "
                          f"{type(model).__name__}: {exc}") from exc
    matched = [name for name, module in model.named_modules()
               if name and any(re.fullmatch(p, name) for p in patterns)
               and not any(key.startswith(f"{name}.") for key in head)
               and any(True for _ in module.parameters())]
    # A matched module that contains another matched one is a stage, not a block.
    blocks = [n for n in matched if not any(m.startswith(f"{n}.") for m in matched)]
    if not blocks:
        raise MethodError(f"adapters found no blocks in {type(model).__name__} "
                          f"(patterns {patterns})")
    return blocks


def _torchvision_blocks(model: nn.Module, head: frozenset[str]) -> list[str]:
    """The outermost modules of a `TORCHVISION_BLOCKS` class, in module order."""
    matched = [name for name, module in model.named_modules()
               if name and type(module).__name__ in TORCHVISION_BLOCKS
               and type(module).__module__.startswith("torchvision.")
               and not any(key.startswith(f"{name}.") for key in head)]
    blocks = [n for n in matched if not any(n.startswith(f"{m}.") for m in matched)]
    if not blocks:
        raise MethodError(f"adapters do not know the blocks of torchvision's "
                          f"{type(model).__name__}: it has none of the block classes of "
                          "torchvision's ResNet, MobileNet, EfficientNet, ConvNeXt, RegNet, ViT, "
                          "Swin and the like (use --method taps or lora: they adapt any model)")
    return blocks


def _block_patterns(groups: dict) -> list[str]:
    """The regexes of timm's "blocks" group that name whole blocks (not fixed-ordinal extras)."""
    entries = groups["blocks"]
    if isinstance(entries, str):
        entries = [entries]
    patterns = []
    for entry in entries:
        if isinstance(entry, str):
            patterns.append(entry)
        elif entry[1] is None:  # (regex, None): the ordinal comes from the regex's own groups
            patterns.append(entry[0])
    return patterns


def trace_blocks(model: nn.Module, head: frozenset[str], example: Tensor) -> list[BlockSite]:
    """Every block with its output layout, from one no-grad forward of `example` in eval mode.

    The model's train/eval flags are restored afterwards; nothing in it changes.
    """
    names = backbone_blocks(model, head)
    modules = dict(model.named_modules())
    shapes: dict[str, torch.Size] = {}

    def record(name: str):
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            if not isinstance(output, Tensor):
                raise MethodError(f"block {name!r} returns a {type(output).__name__}, "
                                  "not a tensor: adapters cannot attach to it")
            shapes[name] = output.shape
        return hook

    handles = [modules[name].register_forward_hook(record(name)) for name in names]
    modes = {module: module.training for module in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            model(example[:1])
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    sites = []
    for name in names:
        if name not in shapes:
            raise MethodError(f"block {name!r} did not run in the model's forward pass")
        channels, channels_last = _layout(name, modules[name], shapes[name])
        sites.append(BlockSite(name, channels, channels_last,
                               sum(p.numel() for p in modules[name].parameters())))
    return sites


def _layout(name: str, block: nn.Module, shape: torch.Size) -> tuple[int, bool]:
    """(C, channels_last) of a block output of `shape` (rule in the module docstring)."""
    if len(shape) in (2, 3):
        return shape[-1], True
    if len(shape) != 4:
        raise MethodError(f"block {name!r} outputs shape {tuple(shape)}; adapters need "
                          "(B, C, H, W), (B, H, W, C), (B, N, D) or (B, D)")
    norms = [m for _, m in norm_layers(block)]
    features = _norm_features(norms[-1]) if norms else None
    if shape[-1] != shape[1] and features == shape[-1]:
        return shape[-1], True
    return shape[1], False


def _norm_features(norm: nn.Module) -> int | None:
    """The feature count a norm layer normalises (BatchNorm, GroupNorm, LayerNorm)."""
    for attr in ("num_features", "num_channels"):
        if isinstance(getattr(norm, attr, None), int):
            return getattr(norm, attr)
    shape = getattr(norm, "normalized_shape", None)
    return int(shape[-1]) if shape else None


def attached(model: nn.Module, attr: str, method: str) -> nn.ModuleDict:
    """The ModuleDict `attr` that `method`'s `attach` put on `model`; MethodError if absent."""
    modules = getattr(model, attr, None)
    if not isinstance(modules, nn.ModuleDict):
        raise MethodError(f"{method}: the model has no attached modules (call attach first)")
    return modules


def hook_blocks(model: nn.Module, attr: str, sites: list[BlockSite],
                modules: dict[str, nn.Module], method: str) -> nn.ModuleDict:
    """Put `modules` (by site key) on `model` as the ModuleDict `attr`, hooked onto the blocks.

    Every module's `hook` replaces its block's output.
    """
    if hasattr(model, attr):
        raise MethodError(f"{method}: the model already has attached modules ({attr!r})")
    reference = next(model.parameters())
    holder = nn.ModuleDict(modules).to(device=reference.device, dtype=reference.dtype)
    model.add_module(attr, holder)
    blocks = dict(model.named_modules())
    for site in sites:
        blocks[site.name].register_forward_hook(holder[site.key].hook)
    return holder


def site_names(model: nn.Module, holder: nn.ModuleDict) -> list[str]:
    """Block names of the keys of `holder`, in the model's module order."""
    keys = set(holder.keys())
    return [name for name, _ in model.named_modules() if name and "~" not in name
            and site_key(name) in keys]
