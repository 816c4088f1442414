"""Norm policies (`--norms task|affine|base|split`): what each trains, tracks, stores and restores,
for every method that trains norm layers."""

from __future__ import annotations

import pytest
import timm
import torch
from safetensors.torch import load
from torch import nn

import taps_cl
from taps_cl.errors import MethodError
from taps_cl.manager import Manager
from taps_cl.methods.base import Dependency
from taps_cl.methods.catalog import get_method, load_builtin
from taps_cl.methods.gates import gated_layers
from taps_cl.methods.merging import build_composed, merge_state
from taps_cl.methods.norms import NORM_POLICIES, NormPolicy
from taps_cl.methods.options import declared_options
from tests.test_cli import assert_one_line_error, run
from tests.test_methods import (
    CLASSES,
    IMG,
    eval_out,
    make_base,
    make_timm,
    prepared_task,
    task_model,
    timm_head,
    train_steps,
)

ARCH = "test_efficientnet"  # BatchNorm everywhere (timm's BatchNormAct2d)
WITH_NORMS = ("taps", "lora", "adapter", "fusion", "finetune")
FAST = {"epochs": 1, "batch_size": 16, "img_size": 32, "seed": 0}
STATS = ("running_mean", "running_var", "num_batches_tracked")


@pytest.fixture(scope="module")
def base_state() -> dict:
    return make_base(ARCH)


def norm_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The norm layers, found here independently of taps_cl.methods.layers, in module order."""
    kinds = (nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)
    return [(n, m) for n, m in model.named_modules() if isinstance(m, kinds)]


def expected_norm_keys(model: nn.Module, norms: str, split: float = 0.5) -> set[str]:
    """What a task stores of its norm layers under a policy (see taps_cl/methods/norms.py)."""
    layers = norm_modules(model)
    early = round(split * len(layers)) if norms == "split" else 0
    keys: set[str] = set()
    for i, (name, module) in enumerate(layers):
        role = "affine" if norms == "split" and i < early else norms
        role = "task" if role == "split" else role
        if role == "task":
            keys |= {f"{name}.{k}" for k in module.state_dict()}
        elif role == "affine":
            keys |= {f"{name}.{k}" for k, _ in module.named_parameters()}
    return keys


def stored_norm_keys(tensors: dict, model: nn.Module) -> set[str]:
    every = {f"{n}.{k}" for n, m in norm_modules(model) for k in m.state_dict()}
    return {k[len("set/"):] for k in tensors if k.startswith("set/")} & every


# ------------------------------------------------------------------------------ the options


def test_every_method_that_trains_norms_declares_the_policy_and_progressive_does_not():
    methods = load_builtin()
    for name in WITH_NORMS:
        fields = {f.name: spec for f, spec in declared_options(methods[name].Config)}
        assert fields["norms"]["choices"] == NORM_POLICIES, name
        default = "affine" if name in ("adapter", "fusion") else "task"
        assert get_method(name, fuse="x" if name == "fusion" else None).config.norms == default
    for name in ("progressive", "linear"):
        with pytest.raises(MethodError, match="no option 'norms'"):
            get_method(name, norms="base")


@pytest.mark.parametrize(("options", "message"), [
    ({"norms": "frozen"}, r"taps: norms must be one of task, affine, base, split"),
    ({"norms": "task", "norm_split": 0.25}, r"norm_split applies to norms 'split', not 'task'"),
    ({"norms": "split", "norm_split": 1.5}, r"norm_split must be <= 1"),
    ({"norms": "split", "norm_split": -0.1}, r"norm_split must be >= 0"),
])
def test_bad_policies_are_refused(options, message):
    with pytest.raises(MethodError, match=message):
        get_method("taps", **options)


def test_the_flag_is_refused_for_progressive_in_one_line(tmp_path, capsys):
    code, _, err = run(capsys, "--home", str(tmp_path), "task", "add", "t", "--base", "b",
                       "--data", "digits", "--method", "progressive", "--norms", "base")
    assert code == 1
    assert_one_line_error(err, r"--norms applies to --method taps, lora, finetune, adapter, "
                               r"fusion, not progressive")


@pytest.mark.parametrize("split", [0.0, 0.3, 0.5, 1.0])
def test_split_gives_the_first_fraction_of_the_norm_layers_the_base_statistics(split):
    model = make_timm(ARCH, CLASSES)
    layers = norm_modules(model)
    roles = NormPolicy("split", split).roles(model)
    assert [(n, m) for n, m, _ in roles] == layers  # module order = forward order here
    early = round(split * len(layers))
    assert [r for _, _, r in roles] == ["affine"] * early + ["task"] * (len(layers) - early)
    assert roles[0][0] == "bn1"  # the stem's norm first, the head's (bn2) last
    assert roles[-1][0] == "bn2"
    for norms in ("task", "affine", "base"):
        assert {r for _, _, r in NormPolicy(norms).roles(model)} == {norms}


# -------------------------------------------------------------- training, storing, rebuilding


def rebuilt(method, base_state: dict, tensors: dict, deps) -> nn.Module:
    model = make_timm(ARCH, CLASSES)
    head = timm_head(model)
    if method.mergeable:
        model.load_state_dict(merge_state(base_state, tensors, head), strict=True)
        return model
    return build_composed(method, model, head, base_state, tensors, deps,
                          torch.randn(2, 3, IMG, IMG))


def fresh(method, base_state: dict, deps) -> tuple[nn.Module, frozenset[str]]:
    """A task model prepared by `method` the way the manager does (attach and place first)."""
    model, head = task_model(ARCH, base_state)
    if not method.mergeable:
        method.attach(model, head, deps, torch.randn(2, 3, IMG, IMG))
        placed = {k: v for d in deps for k, v in method.dependency_state(d).items()}
        model.load_state_dict({**model.state_dict(), **placed}, strict=True)
    return method.prepare(model, head), head


def with_policy(name: str, norms: str, base_state: dict):
    """(method, prepared model, head, dependencies) of `name` under the policy `norms`; fusion
    fuses one adapter task trained on the same base."""
    deps = []
    if name == "fusion":
        adapter, model, head, _ = prepared_task("adapter", ARCH, base_state, seed=2)
        train_steps(adapter, model, steps=1)
        deps = [Dependency("earlier", "adapter", adapter.config_dict(),
                           adapter.extract(model, head).tensors)]
    method = get_method(name, norms=norms, fuse="earlier" if name == "fusion" else None)
    model, head = fresh(method, base_state, deps)
    return method, model, head, deps


@pytest.mark.parametrize("norms", NORM_POLICIES)
@pytest.mark.parametrize("name", WITH_NORMS)
def test_each_policy_trains_tracks_and_stores_what_it_says(base_state, name, norms):
    method, model, head, deps = with_policy(name, norms, base_state)
    roles = {n: r for n, _, r in NormPolicy(norms).roles(model)}
    for layer, module in norm_modules(model):
        trains = {p.requires_grad for p in module.parameters()}
        assert trains == {roles[layer] != "base"}, (layer, roles[layer])
    train_steps(method, model, steps=3)

    trained = model.state_dict()
    for layer, module in norm_modules(model):
        same_stats = all(torch.equal(trained[f"{layer}.{k}"], base_state[f"{layer}.{k}"])
                         for k in STATS)
        # Statistics move only where the task tracks its own; affine moves unless frozen.
        assert same_stats == (roles[layer] != "task"), (layer, roles[layer])
        same_affine = torch.equal(trained[f"{layer}.weight"], base_state[f"{layer}.weight"])
        assert same_affine == (roles[layer] == "base"), (layer, roles[layer])

    state = method.extract(model, head)
    assert stored_norm_keys(state.tensors, model) == expected_norm_keys(model, norms)
    assert all(f"set/{k}" in state.tensors for k in head)
    if name == "finetune":  # everything else is stored whole
        non_norm = {k for k in trained} - {f"{n}.{k}" for n, m in norm_modules(model)
                                           for k in m.state_dict()}
        assert {k for k in state.tensors if k.startswith("set/")} == {
            f"set/{k}" for k in non_norm | expected_norm_keys(model, norms)}
    x = torch.randn(4, 3, IMG, IMG)
    torch.testing.assert_close(eval_out(rebuilt(method, base_state, state.tensors, deps), x),
                               eval_out(model, x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("norms", ["affine", "base"])
def test_a_layer_the_task_leaves_computes_the_base_s_function(base_state, norms):
    """With every gate off, a TAPS task's body is the base with, under `affine`, only its norm
    layers' affine parameters changed — the statistics are the base's; under `base`, the base
    itself. Under `task` the re-estimated statistics change every norm layer."""
    base = make_timm(ARCH, CLASSES)
    base.load_state_dict({**base.state_dict(), **{k: v for k, v in base_state.items()
                                                  if not k.startswith("classifier.")}})
    x = torch.randn(4, 3, IMG, IMG)
    features = {}
    for policy in (norms, "task"):
        method = get_method("taps", lam=0.0, norms=policy)
        model, head = fresh(method, base_state, [])
        train_steps(method, model, steps=3)
        for _, _, gate in gated_layers(model):
            gate.switch_off()
        expected = make_timm(ARCH, CLASSES)
        state = method.extract(model, head)
        affine = {k[len("set/"):]: v for k, v in state.tensors.items()
                  if k.startswith("set/") and k.endswith((".weight", ".bias"))
                  and not k.startswith("set/classifier.")}
        expected.load_state_dict({**base.state_dict(), **affine})
        model.eval()
        expected.eval()
        with torch.no_grad():
            features[policy] = (model.forward_features(x), expected.forward_features(x))
    got, wanted = features[norms]
    assert torch.equal(got, wanted)
    if norms == "base":
        with torch.no_grad():
            assert torch.equal(got, base.eval().forward_features(x))
    got, wanted = features["task"]
    assert not torch.allclose(got, wanted)


# ------------------------------------------------------------------ through the registry


@pytest.fixture(scope="module")
def registry(tmp_path_factory, image_data):
    """One registry with a task of every method × policy (test_efficientnet, one epoch)."""
    home = tmp_path_factory.mktemp("norms") / "home"
    with Manager(home) as m:
        m.add_base("b", f"timm:{ARCH}")
        for name in ("taps", "lora", "adapter", "finetune"):
            options: dict = {"rank": 2, "factor_min_params": 1000} if name == "lora" else {}
            for norms in NORM_POLICIES:
                m.add_task(f"{name}-{norms}", "b", f"imagefolder:{image_data}", method=name,
                           method_options={**options, "norms": norms}, **FAST)
    return home


@pytest.mark.parametrize("norms", NORM_POLICIES)
@pytest.mark.parametrize("name", ["taps", "lora", "adapter", "finetune"])
def test_a_recorded_task_stores_restores_and_exports_as_its_policy_says(
        registry, tmp_path, name, norms):
    fresh = timm.create_model(ARCH, num_classes=3)
    with Manager(registry) as m:
        task = m.get_task(f"{name}-{norms}")
        assert task.method_config["norms"] == norms
        tensors = load(m.registry.read_artifact(task.artifact))
        assert stored_norm_keys(tensors, fresh) == expected_norm_keys(fresh, norms)
        assert task.task_params == sum(t.numel() for t in tensors.values())
        probe = load(m.registry.read_artifact(task.probe))
        model = m.restore(task.name)  # refused unless it reproduces the probe logits
        base = m.models.base_state(m.get_base("b"))
        restored = model.state_dict()
        roles = {n: r for n, _, r in NormPolicy(norms).roles(fresh)}
        for layer, _ in norm_modules(fresh):
            kept = all(torch.equal(restored[f"{layer}.{k}"], base[f"{layer}.{k}"]) for k in STATS)
            assert kept == (roles[layer] != "task"), layer
        out = m.restore_to_file(task.name, tmp_path / "t.safetensors")
    again = taps_cl.load_file(out)
    with torch.no_grad():
        assert (again(probe["inputs"]) - probe["logits"]).abs().max() <= 1e-5


def test_every_policy_s_task_verifies(registry):
    with Manager(registry) as m:
        checks = m.verify()
        assert len(checks) == 16 and all(c.ok for c in checks), [c for c in checks if not c.ok]


def test_adapters_default_to_affine_and_old_adapter_configs_restore_task_norms():
    """`affine` became the adapters' default later: an adapter or fusion config recorded without
    a norm policy trained with the task's own statistics and is restored so; a recorded policy,
    or a new task's default, is left as it is."""
    from taps_cl.methods.catalog import stored_method

    assert get_method("adapter").config.norms == "affine"
    assert get_method("fusion", fuse="a").config.norms == "affine"
    for method in ("taps", "lora", "finetune"):
        assert get_method(method).config.norms == "task"
    old = {"reduction": 16, "activation": "relu"}
    assert stored_method("adapter", old).config.norms == "task"
    assert stored_method("adapter", {**old, "norms": "affine"}).config.norms == "affine"
    assert stored_method("fusion", {**old, "fuse": ["a"]}).config.norms == "task"
