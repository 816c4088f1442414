"""Invariants of every registered method, and the TAPS specifics (gates, penalty, storage)."""

from __future__ import annotations

import json

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import BatchNormAct2d, Conv2dSame, LayerNorm2d
from torch import nn
from torch.nn.utils import parametrize
from torchvision.models import resnet18

from taps_cl.errors import MethodError
from taps_cl.methods.base import Dependency
from taps_cl.methods.catalog import get_method, load_builtin
from taps_cl.methods.gates import gate_of, gated_layers
from taps_cl.methods.layers import adaptable_layers, norm_layers
from taps_cl.methods.merging import merge_state
from taps_cl.methods.progressive.sharing import band_blob, band_dependency

# Every built-in method (the catalog imports them on the first lookup).
METHODS = load_builtin()

ARCHS = ["test_resnet", "test_efficientnet", "test_convnext", "test_vit"]
IMG = 32
CLASSES = 3


def make_timm(arch: str, num_classes: int) -> nn.Module:
    # ViT needs its input size at construction; a small one keeps the tests fast.
    kwargs = {"img_size": IMG} if arch == "test_vit" else {}
    return timm.create_model(arch, num_classes=num_classes, **kwargs)


def timm_head(model: nn.Module) -> frozenset[str]:
    prefix = model.pretrained_cfg["classifier"] + "."
    return frozenset(k for k in model.state_dict() if k.startswith(prefix))


def clone_state(state: dict) -> dict:
    return {k: v.detach().clone() for k, v in state.items()}


def make_base(arch: str) -> dict:
    """A 'pretrained' base: random weights with non-trivial norm statistics and a 10-class head."""
    torch.manual_seed(0)
    base = make_timm(arch, 10)
    with torch.no_grad():
        for _, module in norm_layers(base):
            # timm zero-initialises some norm scales (e.g. the last BN of a residual block);
            # a pretrained base has none, and a zero scale would cut gradients to whole blocks.
            if getattr(module, "weight", None) is not None:
                module.weight.uniform_(0.5, 1.5)
    base.train()
    with torch.no_grad():
        base(torch.randn(8, 3, IMG, IMG))  # moves BatchNorm running stats away from 0/1
    return clone_state(base.state_dict())


def task_model(arch: str, base_state: dict, seed: int = 1) -> tuple[nn.Module, frozenset[str]]:
    """A fresh copy of the base with a new CLASSES-way head, as the manager hands it to prepare."""
    torch.manual_seed(seed)
    model = make_timm(arch, CLASSES)
    head = timm_head(model)
    state = model.state_dict()
    state.update({k: v for k, v in base_state.items() if k not in head})
    model.load_state_dict(state, strict=True)
    return model, head


def prepared_task(name: str, arch: str, base_state: dict, seed: int = 1):
    """(method, model, head, dependencies): `name` on a fresh task model, set up as the manager
    does.

    A composed method is attached first; fusion fuses one adapter task trained on the same base;
    progressive joins the group of a task that trained all three bands (its shared and group
    bands are the dependencies).
    """
    deps = []
    if name == "fusion":
        adapter, model, head, _ = prepared_task("adapter", arch, base_state, seed=seed + 1)
        train_steps(adapter, model, steps=1)
        tensors = adapter.extract(model, head).tensors
        deps = [Dependency("earlier", "adapter", adapter.config_dict(), tensors)]
    if name == "progressive":
        first = get_method("progressive", group="g", train_bands=["shared", "group", "task"])
        model, head = task_model(arch, base_state, seed=seed + 1)
        first.attach(model, head, [], torch.randn(2, 3, IMG, IMG))
        first.prepare(model, head)
        train_steps(first, model, steps=1)
        deps = [band_dependency(band_blob(first.config, band, "g",
                                          first.band_tensors(model, band), "base"))
                for band in ("shared", "group")]
    method = get_method(name, fuse=",".join(d.name for d in deps) if name == "fusion" else None,
                        group="g" if name == "progressive" else None)
    model, head = task_model(arch, base_state, seed=seed)
    if not method.mergeable:
        method.attach(model, head, deps, torch.randn(2, 3, IMG, IMG))
        placed = {k: v for d in deps for k, v in method.dependency_state(d).items()}
        model.load_state_dict({**model.state_dict(), **placed}, strict=True)
    return method, method.prepare(model, head), head, deps


def train_steps(method, model: nn.Module, steps: int = 3, lr: float = 1e-2, epoch: int = 5,
                img: int = IMG) -> None:
    """A few optimiser steps on one random batch, the way fit() takes them."""
    optimizer = torch.optim.AdamW(method.param_groups(model, lr, 0.01))
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(8, 3, img, img, generator=gen)
    y = torch.randint(0, CLASSES, (8,), generator=gen)
    for _ in range(steps):
        method.set_train_mode(model)
        loss = F.cross_entropy(model(x), y)
        extra = method.extra_loss(model, epoch)
        if extra is not None:
            loss = loss + extra
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def eval_out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


@pytest.fixture(scope="module", params=ARCHS)
def arch_base(request) -> tuple[str, dict]:
    return request.param, make_base(request.param)


# ------------------------------------------------------------------------- shared invariants


@pytest.mark.parametrize("name", sorted(n for n in METHODS if METHODS[n].mergeable))
def test_merge_gives_plain_model_with_same_outputs(name, arch_base):
    arch, base_state = arch_base
    method = get_method(name)
    model, head = task_model(arch, base_state)
    model = method.prepare(model, head)
    train_steps(method, model)
    state = method.extract(model, head)

    merged = merge_state(base_state, state.tensors, head)
    restored = make_timm(arch, CLASSES)
    # A plain state dict: exactly the architecture's keys (no parametrizations, no extras).
    assert merged.keys() == restored.state_dict().keys()
    restored.load_state_dict(merged, strict=True)
    x = torch.randn(4, 3, IMG, IMG)
    torch.testing.assert_close(eval_out(restored, x), eval_out(model, x), atol=1e-5, rtol=0)
    # Stored tensors are CPU copies: changing the model afterwards must not change them.
    before = {k: v.clone() for k, v in state.tensors.items()}
    train_steps(method, model, steps=1)
    for k, v in state.tensors.items():
        assert torch.equal(v, before[k]), k
    assert all(t.device.type == "cpu" and t.is_contiguous() for t in state.tensors.values())


@pytest.mark.parametrize("name", sorted(METHODS))
def test_base_is_never_written(name, arch_base):
    arch, base_state = arch_base
    snapshot = clone_state(base_state)
    method, model, head, _ = prepared_task(name, arch, base_state)
    train_steps(method, model)
    state = method.extract(model, head)
    if METHODS[name].mergeable:
        # Merging is where a base tensor could be written in place (e.g. `base += delta`).
        merged = merge_state(base_state, state.tensors, head)
        changed = any(not torch.equal(merged[k], snapshot[k]) for k in merged if k not in head)
        assert changed == (name != "linear")  # the linear probe keeps the whole body

    for key, value in base_state.items():
        assert torch.equal(value, snapshot[key]), key
    if name == "taps":
        for layer, module, _ in gated_layers(model):
            original = module.parametrizations.weight.original
            assert not original.requires_grad
            assert torch.equal(original, snapshot[f"{layer}.weight"]), layer
    if name == "linear":
        # Everything but the head, BatchNorm running statistics included, is the base.
        trained = model.state_dict()
        for key in base_state:
            if key not in head:
                assert torch.equal(trained[key], snapshot[key]), key


# Composed methods record adapted blocks instead (tests/test_adapters.py).
@pytest.mark.parametrize("name", sorted(n for n in METHODS if METHODS[n].mergeable))
def test_layer_records_cover_every_adaptable_layer(name):
    base_state = make_base("test_vit")  # has both a Conv2d (patch embedding) and Linear layers
    method = get_method(name)
    model, head = task_model("test_vit", base_state)
    expected = [(n, m.weight.numel(), "conv2d" if isinstance(m, nn.Conv2d) else "linear")
                for n, m in adaptable_layers(model, head)]
    model = method.prepare(model, head)
    state = method.extract(model, head)

    assert [(r.name, r.base_params, r.kind) for r in state.layers] == expected
    assert {r.kind for r in state.layers} == {"conv2d", "linear"}
    assert all(f"set/{k}" in state.tensors for k in head)
    delta_keys = {k for k in state.tensors if k.startswith("delta/")}
    factorised = {k.removeprefix("factor_a/") for k in state.tensors if k.startswith("factor_a/")}
    stored_as_delta = {f"delta/{r.name}.weight" for r in state.layers
                       if r.active and f"{r.name}.weight" not in factorised}
    assert delta_keys == (stored_as_delta if name in ("taps", "lora") else set())
    assert state.num_params == sum(t.numel() for t in state.tensors.values())
    json.dumps(method.config_dict())


def test_linear_probe_trains_head_only_and_keeps_statistics():
    base_state = make_base("test_resnet")
    method = get_method("linear")
    model, head = task_model("test_resnet", base_state)
    model = method.prepare(model, head)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(head)
    train_steps(method, model)
    state = method.extract(model, head)
    assert set(state.tensors) == {f"set/{k}" for k in head}
    assert all(not r.active and r.score is None and r.task_params == 0 for r in state.layers)
    for name, module in norm_layers(model):
        assert torch.equal(module.running_mean, base_state[f"{name}.running_mean"]), name


def test_finetune_stores_whole_model_and_trains_everything():
    base_state = make_base("test_resnet")
    method = get_method("finetune")
    model, head = task_model("test_resnet", base_state)
    model = method.prepare(model, head)
    assert all(p.requires_grad for p in model.parameters())
    state = method.extract(model, head)
    assert set(state.tensors) == {f"set/{k}" for k in model.state_dict()}
    assert all(r.active and r.task_params == r.base_params for r in state.layers)


# ------------------------------------------------------------------------------------ layers


def test_adaptable_and_norm_layers_find_timm_subclasses():
    model = timm.create_model("test_efficientnet", num_classes=CLASSES)
    head = timm_head(model)
    names = [n for n, _ in adaptable_layers(model, head)]
    assert "classifier" not in names and "conv_stem" in names
    assert any(isinstance(m, BatchNormAct2d) for _, m in norm_layers(model))

    convnext = timm.create_model("test_convnext", num_classes=CLASSES)
    head = timm_head(convnext)
    assert "head.fc" not in [n for n, _ in adaptable_layers(convnext, head)]
    assert any(isinstance(m, LayerNorm2d) for _, m in norm_layers(convnext))

    vit = make_timm("test_vit", CLASSES)
    names = [n for n, _ in adaptable_layers(vit, timm_head(vit))]
    assert {"patch_embed.proj", "blocks.0.attn.qkv", "blocks.0.mlp.fc2"} <= set(names)
    assert "head" not in names


class SameNet(nn.Module):
    """A tiny net with TF-style 'same' padding convolutions (timm's Conv2dSame)."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.conv1 = Conv2dSame(3, 8, 3, stride=2)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = Conv2dSame(8, 8, 3, stride=2)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def test_taps_keeps_conv2d_same_forward():
    torch.manual_seed(0)
    base_state = clone_state(SameNet(10).state_dict())
    model = SameNet(CLASSES)
    head = frozenset({"fc.weight", "fc.bias"})
    model.load_state_dict({**model.state_dict(),
                           **{k: v for k, v in base_state.items() if k not in head}})
    method = get_method("taps", rank=0)
    model = method.prepare(model, head)
    assert isinstance(model.conv1, Conv2dSame) and gate_of(model.conv1) is not None
    train_steps(method, model, img=15)  # odd size: 'same' padding differs from symmetric
    merged = merge_state(base_state, method.extract(model, head).tensors, head)
    restored = SameNet(CLASSES)
    restored.load_state_dict(merged, strict=True)
    x = torch.randn(2, 3, 15, 15)
    torch.testing.assert_close(eval_out(restored, x), eval_out(model, x), atol=1e-5, rtol=0)


# -------------------------------------------------------------------------------------- TAPS


def test_taps_trains_deltas_norms_head_and_scores_only():
    base_state = make_base("test_resnet")
    method = get_method("taps", rank=0)
    model, head = task_model("test_resnet", base_state)
    model = method.prepare(model, head)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    norms = {f"{n}.{k}" for n, m in norm_layers(model) for k, _ in m.named_parameters()}
    gates = {f"{n}.parametrizations.weight.0.{k}" for n, _, _ in gated_layers(model)
             for k in ("delta", "score")}
    assert trainable == norms | gates | set(head)
    groups = method.param_groups(model, 1e-3, 0.05)
    assert [(g["lr"], g["weight_decay"]) for g in groups] == [(1e-3, 0.05), (1e-2, 0.0)]
    assert len(groups[1]["params"]) == len(adaptable_layers(model, head))
    assert sum(len(g["params"]) for g in groups) == len(trainable)
    with pytest.raises(MethodError, match="already"):
        method.prepare(model, head)


def test_taps_lam_zero_keeps_every_gate_on():
    base_state = make_base("test_resnet")
    method = get_method("taps", rank=0, lam=0.0, warmup_epochs=0)
    model, head = task_model("test_resnet", base_state)
    model = method.prepare(model, head)
    assert method.extra_loss(model, 3) is None
    train_steps(method, model, steps=6)
    state = method.extract(model, head)
    assert all(r.active for r in state.layers)
    assert method.active_layers(model) == len(state.layers)
    assert len([k for k in state.tensors if k.startswith("delta/")]) == len(state.layers)


@pytest.mark.parametrize("arch", ARCHS)
def test_taps_large_lam_switches_gates_off_and_stores_nothing_for_them(arch):
    base_state = make_base(arch)
    method = get_method("taps", rank=0, lam=50.0, warmup_epochs=0, score_lr=0.1)
    model, head = task_model(arch, base_state)
    model = method.prepare(model, head)
    train_steps(method, model, steps=3, epoch=0)
    state = method.extract(model, head)

    off = [r for r in state.layers if not r.active]
    assert len(off) > len(state.layers) // 2
    for r in state.layers:
        assert (f"delta/{r.name}.weight" in state.tensors) == r.active
        assert r.task_params == (r.base_params if r.active else 0)
        assert (r.score >= method.config.tau) == r.active
    # With gates off the merged model still matches (the off deltas are non-zero but unused).
    assert any(gate_of(m).delta.abs().sum() > 0 for n, m, _ in gated_layers(model)
               if n in {r.name for r in off})
    merged = merge_state(base_state, state.tensors, head)
    restored = make_timm(arch, CLASSES)
    restored.load_state_dict(merged, strict=True)
    x = torch.randn(4, 3, IMG, IMG)
    torch.testing.assert_close(eval_out(restored, x), eval_out(model, x), atol=1e-5, rtol=0)


def test_straight_through_gradient_reaches_an_off_gate():
    base_state = make_base("test_resnet")
    method = get_method("taps", rank=0)
    model, head = task_model("test_resnet", base_state)
    model = method.prepare(model, head)
    layers = gated_layers(model)
    (_, off_module, off), (_, on_module, on) = layers[3], layers[4]
    x = torch.randn(4, 3, IMG, IMG)
    y = torch.tensor([0, 1, 2, 0])
    reference = eval_out(model, x)
    with torch.no_grad():
        off.delta.normal_(0, 0.1)
        off.score.fill_(0.05)  # below tau: the delta is not used in the forward pass
    assert not off.is_active()
    torch.testing.assert_close(eval_out(model, x), reference, atol=0, rtol=0)
    with torch.no_grad():
        on.delta.normal_(0, 0.1)
    assert on.gate().item() == 1.0 and off.gate().item() == 0.0  # values exactly 0 or 1

    model.train()
    # cached(): each parametrized weight is computed once, so the forward pass uses exactly the
    # W_eff tensors held here and autograd can differentiate the loss with respect to them.
    with parametrize.cached():
        w_off, w_on = off_module.weight, on_module.weight
        loss = F.cross_entropy(model(x), y)
        g_off, g_on, s_off, s_on, d_off = torch.autograd.grad(
            loss, [w_off, w_on, off.score, on.score, off.delta]
        )
    # Straight-through: dL/ds = <dL/dW_eff, ΔW>, for a gate that is off as for one that is on.
    for g_w, delta, g_s in ((g_off, off.delta, s_off), (g_on, on.delta, s_on)):
        expected = (g_w.double() * delta.detach().double()).sum().item()
        assert abs(expected) > 1e-6  # a real, non-zero gradient is compared
        assert g_s.item() == pytest.approx(expected, rel=1e-5)
    assert d_off.abs().sum() == 0  # off: no gradient reaches the delta itself


def test_penalty_weights_and_warmup():
    base_state = make_base("test_efficientnet")
    model, head = task_model("test_efficientnet", base_state)
    by_params = get_method("taps", rank=0, penalty="params", lam=2.0, warmup_epochs=2)
    model = by_params.prepare(model, head)
    layers = adaptable_layers(model, head)

    weights = by_params.penalty_weights(model)
    assert weights.sum().item() == pytest.approx(1.0, abs=1e-6)
    sizes = torch.tensor([float(m.parametrizations.weight.original.numel()) for _, m in layers])
    torch.testing.assert_close(weights, sizes / sizes.sum())

    by_layers = get_method("taps", rank=0, lam=2.0, warmup_epochs=2)
    uniform = by_layers.penalty_weights(model)
    torch.testing.assert_close(uniform, torch.full((len(layers),), 1 / len(layers)))

    assert by_params.extra_loss(model, 0) is None and by_params.extra_loss(model, 1) is None
    loss = by_params.extra_loss(model, 2)
    assert loss.item() == pytest.approx(2.0 * 0.15, rel=1e-5)  # all scores at score_init
    assert not by_params.selectable(1, 5) and by_params.selectable(2, 5)


# -------------------------------------------------------------------------- torchvision model


def test_torchvision_resnet18_taps_merge():
    torch.manual_seed(0)
    base = resnet18(num_classes=10)
    base_state = clone_state(base.state_dict())
    model = resnet18(num_classes=CLASSES)
    head = frozenset({"fc.weight", "fc.bias"})
    model.load_state_dict({**model.state_dict(),
                           **{k: v for k, v in base_state.items() if k not in head}})
    method = get_method("taps", rank=0)
    model = method.prepare(model, head)
    train_steps(method, model, steps=2)
    with torch.no_grad():
        for _, _, gate in gated_layers(model)[::2]:
            gate.score.fill_(0.05)  # switch every other gate off; their deltas are non-zero
    state = method.extract(model, head)
    assert 0 < state.active_layers < len(state.layers)  # both kinds of layer are exercised

    restored = resnet18(num_classes=CLASSES)
    restored.load_state_dict(merge_state(base_state, state.tensors, head), strict=True)
    x = torch.randn(2, 3, IMG, IMG)
    torch.testing.assert_close(eval_out(restored, x), eval_out(model, x), atol=1e-5, rtol=0)
    for key, value in base_state.items():
        if key not in head and f"set/{key}" not in state.tensors \
                and f"delta/{key}" not in state.tensors:
            assert torch.equal(restored.state_dict()[key], value), key


# ------------------------------------------------------------------- registry and merge errors


def test_get_method_and_config():
    assert {"taps", "finetune", "linear"} <= set(METHODS)
    taps = get_method("taps", lam=0.3, tau=None, penalty="params")
    assert taps.config.lam == 0.3 and taps.config.tau == 0.1 and taps.config.penalty == "params"
    assert get_method("taps", lam=1).config.lam == 1.0  # ints are accepted as floats
    cfg = taps.config_dict()
    assert json.loads(json.dumps(cfg)) == cfg
    assert get_method("taps", **cfg).config == taps.config
    assert get_method("finetune").config_dict() == {"norms": "task", "norm_split": 0.5}


@pytest.mark.parametrize(
    ("name", "overrides", "message"),
    [
        ("nope", {},
         r"unknown method 'nope' \(choose from adapter, finetune, fusion, linear, lora, "
         r"progressive, taps"),
        ("taps", {"lamda": 1.0}, r"no option 'lamda' \(options: lam, tau, score_init"),
        ("linear", {"lam": 1.0}, r"no option 'lam' \(options: none\)"),
        ("taps", {"lam": -1.0}, r"lam must be >= 0"),
        ("taps", {"lam": "big"}, r"lam must be a number"),
        ("taps", {"tau": 0}, r"tau must be > 0"),
        ("taps", {"warmup_epochs": 1.5}, r"warmup_epochs must be an integer"),
        ("taps", {"penalty": "bytes"}, r"penalty must be one of layers, params"),
        ("taps", {"score_lr": float("nan")}, r"score_lr must be a finite number, got nan"),
        ("taps", {"score_lr": float("inf")}, r"score_lr must be a finite number, got inf"),
        ("taps", {"lam": float("inf")}, r"lam must be a finite number"),
        ("taps", {"lam": float("nan")}, r"lam must be a finite number"),
        ("taps", {"tau": float("nan")}, r"tau must be a finite number"),
        ("taps", {"tau": float("-inf")}, r"tau must be a finite number"),
        ("taps", {"score_init": float("inf")}, r"score_init must be a finite number"),
        ("taps", {"lam": 10**400}, r"lam must be a finite number"),
    ],
)
def test_get_method_errors(name, overrides, message):
    with pytest.raises(MethodError, match=message):
        get_method(name, **overrides)


def test_merge_state_rejects_inconsistent_tensors():
    base = {"a.weight": torch.zeros(2, 2), "fc.weight": torch.zeros(5, 2)}
    head = frozenset({"fc.weight"})
    ok = merge_state(base, {"delta/a.weight": torch.ones(2, 2), "set/fc.weight": torch.ones(3, 2)},
                     head)
    assert torch.equal(ok["a.weight"], torch.ones(2, 2)) and ok["fc.weight"].shape == (3, 2)
    assert torch.equal(base["a.weight"], torch.zeros(2, 2))
    with pytest.raises(MethodError, match="no matching base weight"):
        merge_state(base, {"delta/b.weight": torch.ones(2), "set/fc.weight": torch.ones(3, 2)},
                    head)
    with pytest.raises(MethodError, match="shape"):
        merge_state(base, {"delta/a.weight": torch.ones(3), "set/fc.weight": torch.ones(3, 2)},
                    head)
    with pytest.raises(MethodError, match="lacks head"):
        merge_state(base, {}, head)
    with pytest.raises(MethodError, match="neither"):
        merge_state(base, {"other/a.weight": torch.ones(2, 2)}, head)
