"""Composed methods: bottleneck adapters and AdapterFusion (block discovery, rebuild, freezing)."""

from __future__ import annotations

import copy
import json

import pytest
import timm
import torch
from torch import nn
from torchvision import models as torchvision_models
from torchvision.models import mobilenet_v3_small, resnet18, vgg11

from taps_cl.errors import MethodError
from taps_cl.methods.base import Dependency
from taps_cl.methods.blocks import backbone_blocks, site_name, trace_blocks
from taps_cl.methods.catalog import get_method, load_builtin
from taps_cl.methods.layers import norm_layers
from taps_cl.methods.merging import build_composed
from tests.test_methods import (
    ARCHS,
    CLASSES,
    IMG,
    clone_state,
    eval_out,
    make_base,
    make_timm,
    prepared_task,
    task_model,
    timm_head,
    train_steps,
)

# Every built-in method (the catalog imports them on the first lookup).
METHODS = load_builtin()


def example() -> torch.Tensor:
    return torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(7))


def probe_batch() -> torch.Tensor:
    return torch.randn(4, 3, IMG, IMG, generator=torch.Generator().manual_seed(11))


@pytest.fixture(scope="module")
def bases() -> dict[str, dict]:
    return {arch: make_base(arch) for arch in ("test_efficientnet", "test_vit", "test_resnet")}


def adapter_task(arch: str, base_state: dict, seed: int = 1, steps: int = 3, **options):
    """A trained adapter task: (method, trained model, head, extracted state)."""
    method = get_method("adapter", **options)
    model, head = task_model(arch, base_state, seed=seed)
    method.attach(model, head, [], example())
    method.prepare(model, head)
    train_steps(method, model, steps=steps)
    return method, model, head, method.extract(model, head)


def as_dependency(name: str, method, state) -> Dependency:
    return Dependency(name, method.name, method.config_dict(), state.tensors)


def fusion_task(arch: str, base_state: dict, deps: list[Dependency], **options):
    """A fusion model ready to train, set up the way the manager does: attach, place, prepare."""
    method = get_method("fusion", fuse=",".join(d.name for d in deps), **options)
    model, head = task_model(arch, base_state, seed=5)
    method.attach(model, head, deps, example())
    placed = {k: v for dep in deps for k, v in method.dependency_state(dep).items()}
    model.load_state_dict({**model.state_dict(), **placed}, strict=True)
    method.prepare(model, head)
    return method, model, head


def rebuilt(method, arch: str, base_state: dict, state, deps) -> nn.Module:
    return build_composed(method, make_timm(arch, CLASSES), timm_head(make_timm(arch, CLASSES)),
                          base_state, state.tensors, deps, example())


def exported_round_trip(method, arch: str, built: nn.Module, deps) -> nn.Module:
    """The built model's full state into a fresh plain model, attached without dependency data."""
    fresh = make_timm(arch, CLASSES)
    bare = [Dependency(d.name, d.method, d.config, None) for d in deps]
    method.attach(fresh, timm_head(fresh), bare, example())
    fresh.load_state_dict(built.state_dict(), strict=True)
    return fresh


# ------------------------------------------------------------- shared invariant, composed methods

COMPOSED = sorted(name for name, cls in METHODS.items() if not cls.mergeable)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", COMPOSED)
def test_composed_rebuild_gives_the_trained_outputs(name, arch):
    base_state = make_base(arch)
    snapshot = clone_state(base_state)
    method, model, head, deps = prepared_task(name, arch, base_state)
    train_steps(method, model)
    state = method.extract(model, head)
    built = rebuilt(method, arch, base_state, state, deps)
    assert type(built) is type(model)
    x = probe_batch()
    torch.testing.assert_close(eval_out(built, x), eval_out(model, x), atol=1e-6, rtol=0)
    assert all(torch.equal(v, snapshot[k]) for k, v in base_state.items())
    assert all(t.device.type == "cpu" and t.is_contiguous() for t in state.tensors.values())


# ---------------------------------------------------------------------------- block discovery


@pytest.mark.parametrize(
    ("arch", "count", "first", "channels_last"),
    [
        ("test_efficientnet", 5, "blocks.0.0", False),
        ("test_vit", 6, "blocks.0", True),
        ("test_resnet", 4, "layer1.0", False),
        ("test_convnext", 9, "stages.0.blocks.0", False),
        ("tf_efficientnet_lite0", 16, "blocks.0.0", False),
    ],
)
def test_blocks_of_timm_models(arch, count, first, channels_last):
    model = make_timm(arch, CLASSES)
    sites = trace_blocks(model, timm_head(model), example())
    assert len(sites) == count and sites[0].name == first
    assert {s.channels_last for s in sites} == {channels_last}
    # Never the stem or tail groups (conv_head, the final norm, ConvNeXt downsamples).
    assert not any(s.name.startswith(("conv_head", "norm", "head")) or "downsample" in s.name
                   for s in sites)


def test_lite0_block_channels():
    sites = trace_blocks(timm.create_model("tf_efficientnet_lite0"), frozenset(), example())
    assert [s.channels for s in sites] == [16, 24, 24, 40, 40, 80, 80, 80, 112, 112, 112,
                                           192, 192, 192, 192, 320]


def test_blocks_of_torchvision_resnet_and_refusals():
    assert backbone_blocks(resnet18()) == [f"layer{i}.{j}" for i in range(1, 5) for j in (0, 1)]
    assert backbone_blocks(mobilenet_v3_small()) == [f"features.{i}" for i in range(1, 12)]
    with pytest.raises(MethodError, match="blocks of torchvision's VGG.*--method taps"):
        backbone_blocks(vgg11())
    with pytest.raises(MethodError, match="neither a timm model"):
        backbone_blocks(nn.Sequential(nn.Conv2d(3, 4, 3)))


@pytest.mark.parametrize(
    ("arch", "size", "count", "first", "last", "channels_last"),
    [
        ("efficientnet_b0", IMG, 16, "features.1.0", "features.7.0", False),
        ("shufflenet_v2_x0_5", IMG, 16, "stage2.0", "stage4.3", False),
        ("regnet_x_400mf", IMG, 22, "trunk_output.block1.block1-0",
         "trunk_output.block4.block4-11", False),
        ("convnext_tiny", IMG, 18, "features.1.0", "features.7.2", False),
        ("swin_t", 64, 12, "features.1.0", "features.7.1", True),
        ("squeezenet1_1", 64, 8, "features.3", "features.12", False),
    ],
)
def test_blocks_of_torchvision_models(arch, size, count, first, last, channels_last):
    """Torchvision's block classes, outermost; adapters start at the base on every one of them
    (Swin's NHWC blocks get linear adapters; RegNet's names with "-" get escaped keys)."""
    torch.manual_seed(0)
    model = torchvision_models.get_model(arch, weights=None, num_classes=CLASSES).eval()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(3))
    sites = trace_blocks(model, frozenset(), x)
    assert (len(sites), sites[0].name, sites[-1].name) == (count, first, last)
    assert {s.channels_last for s in sites} == {channels_last}
    before = eval_out(model, x)
    method = get_method("adapter", reduction=4)
    method.attach(model, frozenset(), [], x)
    assert [site_name(key) for key in model.taps_adapters] == [s.name for s in sites]
    torch.testing.assert_close(eval_out(model, x), before, atol=0, rtol=0)


def test_channels_last_blocks_get_linear_adapters():
    # Swin's blocks output NHWC maps: the adapter must act on the last dimension.
    torch.manual_seed(0)
    model = timm.create_model("swin_tiny_patch4_window7_224", embed_dim=16, depths=(1, 1),
                              num_heads=(1, 1), img_size=IMG, window_size=4, num_classes=CLASSES)
    head = timm_head(model)
    sites = trace_blocks(model, head, example())
    assert [(s.name, s.channels, s.channels_last) for s in sites] == [
        ("layers.0.blocks.0", 16, True), ("layers.1.blocks.0", 32, True)]
    x = probe_batch()
    before = eval_out(model, x)
    method = get_method("adapter", reduction=4)
    method.attach(model, head, [], example())
    assert isinstance(model.taps_adapters["layers-0-blocks-0"].down, nn.Linear)
    torch.testing.assert_close(eval_out(model, x), before, atol=0, rtol=0)


# ------------------------------------------------------------------------------------- adapter


@pytest.mark.parametrize("arch", ["test_efficientnet", "test_vit", "test_resnet"])
def test_adapter_starts_at_the_base_and_trains_only_its_own(arch, bases):
    base_state = bases[arch]
    model, head = task_model(arch, base_state)
    x = probe_batch()
    before = eval_out(model, x)
    method = get_method("adapter")
    method.attach(model, head, [], example())
    assert type(model) is type(make_timm(arch, CLASSES))
    torch.testing.assert_close(eval_out(model, x), before, atol=0, rtol=0)
    method.prepare(model, head)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    norms = {n for n, p in model.named_parameters()
             if any(n.startswith(f"{m}.") for m, _ in norm_layers(model))}
    assert trainable == ({n for n in trainable if n.startswith("taps_adapters.")} | norms | head)
    assert {n for n, _ in model.named_parameters() if n.startswith("taps_adapters.")} <= trainable

    snapshot = clone_state(base_state)
    train_steps(method, model)
    assert not torch.equal(eval_out(model, x), before)
    state = model.state_dict()
    for key, value in base_state.items():
        assert torch.equal(value, snapshot[key]), key  # the base itself is never written
        norm_key = any(key.startswith(f"{m}.") for m, _ in norm_layers(model))
        if key not in head and not norm_key:
            assert torch.equal(state[key], snapshot[key]), key  # frozen weights stay


@pytest.mark.parametrize("arch", ["test_efficientnet", "test_vit", "test_resnet"])
def test_adapter_save_rebuild_and_export_give_identical_outputs(arch, bases):
    base_state = bases[arch]
    method, model, head, state = adapter_task(arch, base_state)
    x = probe_batch()
    trained = eval_out(model, x)
    assert all(k.startswith(("module/taps_adapters.", "set/")) for k in state.tensors)
    assert all(f"set/{k}" in state.tensors for k in head)
    assert any(k.endswith(".up.weight") and v.abs().sum() > 0 for k, v in state.tensors.items())

    built = rebuilt(method, arch, base_state, state, [])
    assert type(built) is type(model)
    torch.testing.assert_close(eval_out(built, x), trained, atol=1e-6, rtol=0)
    exported = exported_round_trip(method, arch, built, [])
    torch.testing.assert_close(eval_out(exported, x), trained, atol=1e-6, rtol=0)
    # A deep copy carries hooks bound to its own adapters, not to the original's.
    twin = copy.deepcopy(built)
    with torch.no_grad():
        for p in twin.taps_adapters.parameters():
            p.add_(0.1)
    torch.testing.assert_close(eval_out(built, x), trained, atol=1e-6, rtol=0)
    assert not torch.allclose(eval_out(twin, x), trained)

    blocks = [s.name for s in trace_blocks(make_timm(arch, CLASSES), head, example())]
    assert [r.name for r in state.layers] == blocks
    assert {(r.kind, r.active, r.score) for r in state.layers} == {("adapter", True, None)}
    module_numbers = sum(v.numel() for k, v in state.tensors.items() if k.startswith("module/"))
    assert sum(r.task_params for r in state.layers) == module_numbers
    modules = dict(model.named_modules())
    assert [r.base_params for r in state.layers] == [
        sum(p.numel() for p in modules[b].parameters()) for b in blocks]


def test_adapter_rebuild_refuses_missing_or_foreign_tensors(bases):
    arch = "test_efficientnet"
    method, _, _, state = adapter_task(arch, bases[arch], steps=1)
    key = next(k for k in state.tensors if k.startswith("module/"))
    short = type(state)({k: v for k, v in state.tensors.items() if k != key}, state.layers)
    with pytest.raises(MethodError, match="missing"):
        rebuilt(method, arch, bases[arch], short, [])
    wide = get_method("adapter", reduction=4)  # other widths than the stored tensors
    with pytest.raises(MethodError, match="shape"):
        rebuilt(wide, arch, bases[arch], state, [])
    model, head = task_model(arch, bases[arch])
    with pytest.raises(MethodError, match="call attach first"):
        method.prepare(model, head)
    method.attach(model, head, [], example())
    with pytest.raises(MethodError, match="already has attached modules"):
        method.attach(model, head, [], example())


# -------------------------------------------------------------------------------------- fusion


@pytest.fixture(scope="module", params=["test_efficientnet", "test_vit"])
def fused(request, bases):
    """Two trained adapter tasks on one base, as dependencies."""
    arch = request.param
    deps = []
    for name, seed, options in (("upper", 2, {}), ("digits", 3, {"reduction": 8})):
        method, _, _, state = adapter_task(arch, bases[arch], seed=seed, **options)
        deps.append(as_dependency(name, method, state))
    return arch, deps


def test_fusion_freezes_its_dependencies_and_stores_only_its_own(fused, bases):
    arch, deps = fused
    base_state = bases[arch]
    method, model, head = fusion_task(arch, base_state, deps)
    assert method.dependencies() == ("upper", "digits")
    assert type(model) is type(make_timm(arch, CLASSES))
    x = probe_batch()
    assert torch.isfinite(eval_out(model, x)).all()
    assert method.extra_loss(model, 0).item() == 0.0  # value scales start at the identity

    dep_keys = {k for dep in deps for k in method.dependency_state(dep)}
    params = dict(model.named_parameters())
    assert dep_keys and all(not params[k].requires_grad for k in dep_keys)
    own = {n for n, p in params.items() if p.requires_grad and n.startswith("taps_fusion.")}
    assert any(".adapters.own." in n for n in own) and any(n.endswith(".value") for n in own)
    assert not any(".adapters.dep" in n for n in own)

    train_steps(method, model, steps=4, lr=5e-2)
    placed = {k: v for dep in deps for k, v in method.dependency_state(dep).items()}
    current = model.state_dict()
    for key, value in placed.items():
        assert torch.equal(current[key], value), key  # the fused adapters never change
    assert method.extra_loss(model, 0).item() > 0  # the values moved and are regularised

    state = method.extract(model, head)
    assert not any(".adapters.dep" in k for k in state.tensors)
    assert not set(state.tensors.values()) & set(placed.values())
    assert all(k.startswith(("module/taps_fusion.", "set/")) for k in state.tensors)
    assert {(r.kind, r.active) for r in state.layers} == {("fusion", True)}
    module_numbers = sum(v.numel() for k, v in state.tensors.items() if k.startswith("module/"))
    assert sum(r.task_params for r in state.layers) == module_numbers

    trained = eval_out(model, x)
    built = rebuilt(method, arch, base_state, state, deps)
    assert type(built) is type(model)
    torch.testing.assert_close(eval_out(built, x), trained, atol=1e-6, rtol=0)
    exported = exported_round_trip(method, arch, built, deps)
    torch.testing.assert_close(eval_out(exported, x), trained, atol=1e-6, rtol=0)
    # The rebuilt model must use the dependencies' tensors: one lacking is refused.
    lacking = dict(deps[1].tensors)
    del lacking[next(k for k in lacking if k.startswith("module/"))]
    with pytest.raises(MethodError, match="missing"):
        rebuilt(method, arch, base_state, state,
                [deps[0], Dependency("digits", "adapter", deps[1].config, lacking)])


def test_fusion_without_own_adapter_stores_fusion_layers_norms_and_head(fused, bases):
    arch, deps = fused
    method, model, head = fusion_task(arch, bases[arch], deps[:1], own_adapter=False)
    train_steps(method, model, steps=1)
    state = method.extract(model, head)
    assert not any(".adapters." in k for k in state.tensors)
    assert any(k.endswith(".query.weight") for k in state.tensors)
    built = rebuilt(method, arch, bases[arch], state, deps[:1])
    x = probe_batch()
    torch.testing.assert_close(eval_out(built, x), eval_out(model, x), atol=1e-6, rtol=0)


def test_fusion_refuses_wrong_dependencies(fused, bases):
    arch, deps = fused
    method = get_method("fusion", fuse="upper,digits")
    with pytest.raises(MethodError, match="'t1' was trained with 'taps'; fusion reads adapter"):
        method.check_dependency("t1", "taps")
    method.check_dependency("upper", "adapter")
    model, head = task_model(arch, bases[arch])
    with pytest.raises(MethodError, match="expected the tasks upper, digits, got upper"):
        method.attach(model, head, deps[:1], example())
    wrong = [deps[0], Dependency("digits", "taps", {}, {})]
    with pytest.raises(MethodError, match="fusion reads adapter tasks only"):
        method.attach(model, head, wrong, example())
    with pytest.raises(MethodError, match="not one of the fused tasks"):
        method.dependency_state(Dependency("other", "adapter", {}, {}))
    assert not hasattr(model, "taps_fusion")  # refused before attaching anything
    with pytest.raises(MethodError, match="reads no earlier task"):
        get_method("adapter").check_dependency("upper", "adapter")


# ------------------------------------------------------------------------------------- options


def test_configs_round_trip_through_json():
    fusion = get_method("fusion", fuse=" a, b ", key_reduction=8)
    assert fusion.config.fuse == ("a", "b") and fusion.dependencies() == ("a", "b")
    cfg = fusion.config_dict()
    assert json.loads(json.dumps(cfg)) == cfg and cfg["fuse"] == ["a", "b"]
    assert get_method("fusion", **cfg).config == fusion.config
    adapter = get_method("adapter", reduction=8)
    assert get_method("adapter", **adapter.config_dict()).config == adapter.config
    assert METHODS["adapter"].mergeable is False and METHODS["fusion"].mergeable is False


@pytest.mark.parametrize(
    ("name", "overrides", "message"),
    [
        ("fusion", {}, r"fuse needs at least one earlier adapter task"),
        ("fusion", {"fuse": ""}, r"fuse needs at least one"),
        ("fusion", {"fuse": "a,,b"}, r"fuse needs at least one"),
        ("fusion", {"fuse": "a,b,a"}, r"fuse names a more than once"),
        ("fusion", {"fuse": [1, 2]}, r"fuse must be task names"),
        ("fusion", {"fuse": "a", "reduction": 0}, r"reduction must be >= 1"),
        ("fusion", {"fuse": "a", "key_reduction": 1.5}, r"key_reduction must be an integer"),
        ("fusion", {"fuse": "a", "value_reg": float("inf")}, r"value_reg must be a finite"),
        ("fusion", {"fuse": "a", "value_reg": -1.0}, r"value_reg must be >= 0"),
        ("fusion", {"fuse": "a", "own_adapter": "no"}, r"own_adapter must be true or false"),
        ("adapter", {"reduction": 0}, r"reduction must be >= 1"),
        ("adapter", {"reduction": float("inf")}, r"reduction must be an integer"),
        ("adapter", {"activation": "tanh"}, r"activation must be one of relu, gelu"),
    ],
)
def test_config_errors(name, overrides, message):
    with pytest.raises(MethodError, match=message):
        get_method(name, **overrides)


# --------------------------------------------------------------------------------- sizes on Lite0


def test_lite0_sizes_meet_the_targets():
    """Adapter task ≤ 0.06× base, a fusion task's own tensors ≤ 0.05× base (10 classes)."""
    arch, classes = "tf_efficientnet_lite0", 10
    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=classes)
    head = timm_head(model)
    base_params = sum(p.numel() for n, p in model.named_parameters() if n not in head)
    assert 3.3e6 < base_params < 3.4e6
    x = torch.randn(1, 3, 64, 64)  # channels do not depend on the image size
    adapter = get_method("adapter")
    adapter.attach(model, head, [], x)
    adapter_state = adapter.extract(model, head)
    assert len(adapter_state.layers) == 16
    assert adapter_state.num_params <= 0.06 * base_params

    deps = [as_dependency(name, adapter, adapter_state) for name in ("a", "b")]
    fusion = get_method("fusion", fuse="a,b")
    model = timm.create_model(arch, num_classes=classes)
    fusion.attach(model, head, deps, x)
    fusion_state = fusion.extract(model, head)
    assert fusion_state.num_params <= 0.05 * base_params
    attached_numbers = sum(p.numel() for p in model.taps_fusion.parameters())
    assert fusion_state.num_params < attached_numbers + 0.03 * base_params  # deps not stored
