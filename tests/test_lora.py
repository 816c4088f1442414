"""LoRA as a library method, and the low-rank training recipe: LoRA+ learning rates (lora and
compact TAPS), the run-length-normalised TAPS penalty, gradient clipping and divergence caught."""

from __future__ import annotations

import json
import math
import re

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load
from torch import nn
from torch.utils.data import TensorDataset

import taps_cl
from taps_cl.errors import MethodError
from taps_cl.manager import Manager
from taps_cl.methods.catalog import get_method
from taps_cl.methods.gates import (
    FullDelta,
    LowRankDelta,
    LowRankTapsGate,
    delta_layers,
    gated_layers,
)
from taps_cl.methods.layers import adaptable_layers, norm_layers
from taps_cl.methods.merging import merge_state
from taps_cl.training import fit as fit_module
from taps_cl.training.fit import TrainConfig, TrainingDiverged, collapsed, fit
from tests.test_cli import assert_one_line_error, run
from tests.test_compact_taps import eval_out, restored
from tests.test_methods import CLASSES, IMG, make_base, task_model

# Small enough that the tiny timm test models have layers worth factorising.
COMPACT = {"rank": 2, "factor_min_params": 1000}


@pytest.fixture(scope="module")
def bases() -> dict[str, dict]:
    return {arch: make_base(arch) for arch in ("test_efficientnet", "test_vit")}


def prepared(arch: str, base_state: dict, name: str = "lora", **options) -> tuple:
    method = get_method(name, **options)
    model, head = task_model(arch, base_state)
    torch.manual_seed(7)  # the factors A
    return method, method.prepare(model, head), head


def batch(img: int = IMG) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return (torch.randn(8, 3, img, img, generator=gen),
            torch.randint(0, CLASSES, (8,), generator=gen))


def train_steps(method, model: nn.Module, steps: int = 3, lr: float = 2e-2) -> None:
    optimizer = torch.optim.AdamW(method.param_groups(model, lr, 0.0))
    x, y = batch()
    for _ in range(steps):
        method.set_train_mode(model)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


# ------------------------------------------------------------------------ structure and init


def test_b_starts_at_zero_a_kaiming_uniform_and_the_first_forward_is_the_base(bases):
    base_state = bases["test_efficientnet"]
    plain, _ = task_model("test_efficientnet", base_state)
    _, model, _ = prepared("test_efficientnet", base_state, **COMPACT)
    low = [(n, d) for n, _, d in delta_layers(model) if isinstance(d, LowRankDelta)]
    assert len(low) >= 3
    for name, delta in low:
        rest = delta.factor_a.shape[1]
        assert delta.factor_b.shape[1] == delta.factor_a.shape[0] == 2, name
        assert torch.count_nonzero(delta.factor_b) == 0, name
        bound = 1 / math.sqrt(rest)
        assert delta.factor_a.abs().max().item() <= bound, name
        # Uniform on ±bound: the spread is bound/√3, not N(0, 1/rest)'s bound.
        assert delta.factor_a.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.35)
    x = torch.randn(4, 3, IMG, IMG)
    assert torch.equal(eval_out(model, x), eval_out(plain, x))


def test_layers_factorise_exactly_where_compact_taps_factorises(bases):
    base_state = bases["test_efficientnet"]
    _, lora, _ = prepared("test_efficientnet", base_state, **COMPACT)
    _, taps, _ = prepared("test_efficientnet", base_state, name="taps", **COMPACT)
    lora_kinds = {n: isinstance(d, LowRankDelta) for n, _, d in delta_layers(lora)}
    taps_kinds = {n: isinstance(g, LowRankTapsGate) for n, _, g in gated_layers(taps)}
    assert lora_kinds == taps_kinds
    assert any(lora_kinds.values()) and not all(lora_kinds.values())
    assert not lora_kinds["blocks.3.0.conv_dw"]  # depthwise: a full delta
    assert all(type(d) is FullDelta for _, _, d in delta_layers(lora)
               if not isinstance(d, LowRankDelta))
    assert not gated_layers(lora)  # no gates, no scores


def test_trains_deltas_norms_and_head_only_with_lora_plus_rates(bases):
    base_state = bases["test_efficientnet"]
    method, model, head = prepared("test_efficientnet", base_state, **COMPACT)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    deltas = [d for _, _, d in delta_layers(model)]
    own = {id(p) for d in deltas for p in d.parameters()}
    norms = {id(p) for _, m in norm_layers(model) for p in m.parameters()}
    heads = {id(p) for n, p in model.named_parameters() if n in head}
    assert trainable == own | norms | heads
    groups = {g["name"]: g for g in method.param_groups(model, 1e-3, 0.01)}
    assert set(groups) == {"task", "factors", "factors_b"}
    assert groups["task"]["lr"] == groups["factors"]["lr"] == 1e-3
    assert groups["factors_b"]["lr"] == pytest.approx(16e-3)  # LoRA+'s default ratio
    assert {id(p) for p in groups["factors_b"]["params"]} == {
        id(d.factor_b) for d in deltas if isinstance(d, LowRankDelta)}
    assert {id(p) for p in groups["factors"]["params"]} == {
        id(d.factor_a) for d in deltas if isinstance(d, LowRankDelta)}
    assert sum(len(g["params"]) for g in groups.values()) == len(trainable)
    one = get_method("lora", b_lr_ratio=1, **COMPACT).param_groups(model, 1e-3, 0.0)
    assert [g["name"] for g in one] == ["task", "factors"]


def test_compact_taps_takes_a_b_learning_rate_ratio_and_keeps_one_group_by_default(bases):
    base_state = bases["test_efficientnet"]
    method, model, _ = prepared("test_efficientnet", base_state, name="taps", **COMPACT)
    assert method.config.b_lr_ratio == 1.0
    assert [g["name"] for g in method.param_groups(model, 1e-3, 0.0)] == [
        "task", "scores", "factors"]
    plus = get_method("taps", factor_lr=2e-3, b_lr_ratio=4, **COMPACT)
    groups = {g["name"]: g for g in plus.param_groups(model, 1e-3, 0.0)}
    assert groups["factors"]["lr"] == 2e-3 and groups["factors_b"]["lr"] == pytest.approx(8e-3)
    gates = [g for _, _, g in gated_layers(model) if isinstance(g, LowRankTapsGate)]
    assert {id(p) for p in groups["factors_b"]["params"]} == {id(g.factor_b) for g in gates}


@pytest.mark.parametrize(("options", "scale"), [
    ({"rank": 4}, 1.0),
    ({"rank": 4, "alpha": 8.0}, 2.0),
    ({"rank": 4, "alpha": 8.0, "rslora": True}, 4.0),
    ({"rank": 16, "rslora": True}, 4.0),  # α = rank by default: √rank
])
def test_scale_is_alpha_over_rank_or_over_its_root_with_rslora(bases, options, scale):
    method = get_method("lora", factor_min_params=1000, **options)
    assert method.config.scale == pytest.approx(scale)
    base_state = bases["test_efficientnet"]
    _, model, _ = prepared("test_efficientnet", base_state, factor_min_params=1000, **options)
    module, delta = next((m, d) for _, m, d in delta_layers(model)
                         if isinstance(d, LowRankDelta))
    with torch.no_grad():
        delta.factor_b.normal_()
    original = module.parametrizations.weight.original
    update = (module.weight - original).detach()
    expected = (delta.factor_b @ delta.factor_a).reshape(original.shape) * scale
    torch.testing.assert_close(update, expected, rtol=1e-5, atol=1e-6)
    stored = delta.stored_tensors("w")
    torch.testing.assert_close(stored["factor_b/w"], delta.factor_b * scale, rtol=0, atol=0)


# ------------------------------------------------------------------------ merging and size


@pytest.mark.parametrize("arch", ["test_efficientnet", "test_vit"])
def test_merged_weights_are_the_trained_weights_and_the_outputs_agree(bases, arch):
    base_state = bases[arch]
    method, model, head = prepared(arch, base_state, alpha=16.0, **COMPACT)  # scale 8
    train_steps(method, model)
    state = method.extract(model, head)
    merged = merge_state(base_state, state.tensors, head)
    for name, module, delta in delta_layers(model):
        key = f"{name}.weight"
        if isinstance(delta, LowRankDelta):
            assert {f"factor_b/{key}", f"factor_a/{key}"} <= set(state.tensors)
            assert torch.count_nonzero(delta.factor_b) > 0
        else:
            assert f"delta/{key}" in state.tensors
        # The stored scale-folded B gives exactly the weight the trained model computes with.
        assert torch.equal(merged[key], module.weight.detach()), key
    plain = restored(arch, base_state, state.tensors, head)
    x = torch.randn(4, 3, IMG, IMG)
    torch.testing.assert_close(eval_out(plain, x), eval_out(model, x), atol=1e-6, rtol=0)
    assert all(r.active and r.score is None for r in state.layers)
    json.dumps(method.config_dict())


def expected_numbers(model: nn.Module, head: frozenset[str], rank: int, min_params: int) -> int:
    """What a LoRA task stores, counted from the shapes alone: R·(out + rest) per factorised
    layer, the weight's size per other layer, every norm layer's state, the head."""
    total = 0
    for _, module in adaptable_layers(model, head):
        w = module.weight
        out, rest = w.shape[0], w[0].numel()
        factor = (getattr(module, "groups", 1) == 1 and w.numel() >= min_params
                  and rank * (out + rest) < w.numel())
        total += rank * (out + rest) if factor else w.numel()
    state = model.state_dict()
    total += sum(v.numel() for n, m in norm_layers(model) for v in m.state_dict().values())
    return total + sum(state[k].numel() for k in head)


def test_through_the_registry_the_stored_size_is_what_report_budget_counts(
        tmp_path, image_data, capsys):
    home = str(tmp_path / "home")
    with Manager(home) as m:
        m.add_base("b", "timm:test_efficientnet")
    code, _, err = run(capsys, "--home", home, "--json", "task", "add", "t", "--base", "b",
                         "--data", f"imagefolder:{image_data}", "--method", "lora",
                         "--rank", "2", "--factor-min-params", "1000", "--alpha", "4",
                         "--rslora", "--b-lr-ratio", "4", "--epochs", "1",
                         "--batch-size", "16", "--img-size", "32")
    assert code == 0, err
    with Manager(home) as m:
        task = m.get_task("t")
        assert task.method == "lora"
        assert task.method_config == {"rank": 2, "alpha": 4.0, "rslora": True,
                                      "b_lr_ratio": 4.0, "factor_min_params": 1000,
                                      "norms": "task", "norm_split": 0.5}
        tensors = load(m.registry.read_artifact(task.artifact))
        numbers = sum(t.numel() for t in tensors.values())
        fresh = timm.create_model("test_efficientnet", num_classes=3)
        head = frozenset(m.registry.get_base("b").head_keys)
        assert numbers == task.task_params == expected_numbers(fresh, head, 2, 1000)
        (row,) = m.budget().tasks
        assert row.task_params == numbers
        assert row.active_layers == row.total_layers == len(adaptable_layers(fresh, head))
        assert sum(layer.task_params for layer in task.layers) + sum(
            t.numel() for k, t in tensors.items() if k.startswith("set/")) == numbers
        probe = load(m.registry.read_artifact(task.probe))
        model = m.restore("t")
        assert type(model) is type(fresh)  # a plain timm model: the factors are folded in
        with torch.no_grad():
            assert (model(probe["inputs"]) - probe["logits"]).abs().max() <= 1e-5
        out_file = m.restore_to_file("t", tmp_path / "t.safetensors")
        assert not [c for c in m.verify() if not c.ok]
    again = taps_cl.load_file(out_file)
    with torch.no_grad():
        assert (again(probe["inputs"]) - probe["logits"]).abs().max() <= 1e-5


@pytest.mark.parametrize(("options", "message"), [
    ({"rank": 0}, r"lora: rank must be >= 1"),
    ({"alpha": 0.0}, r"lora: alpha must be > 0"),
    ({"rslora": "yes"}, r"lora: rslora must be true or false"),
    ({"b_lr_ratio": 0}, r"lora: b_lr_ratio must be > 0"),
    ({"lam": 1.0}, r"no option 'lam'"),
])
def test_bad_options_are_refused(options, message):
    with pytest.raises(MethodError, match=message):
        get_method("lora", **options)


def test_rank_zero_on_the_command_line_is_one_line(tmp_path, capsys):
    with Manager(tmp_path) as m:
        m.add_base("b", "timm:test_resnet")
    code, _, err = run(capsys, "--home", str(tmp_path), "task", "add", "t", "--base", "b",
                       "--data", "digits", "--method", "lora", "--rank", "0")
    assert code == 1
    assert_one_line_error(err, r"rank must be >= 1")


# --------------------------------------------------------------- the TAPS penalty's length


def test_the_penalty_is_normalised_by_the_penalised_epochs(bases):
    base_state = bases["test_vit"]
    unfitted, model, _ = prepared("test_vit", base_state, name="taps", lam=0.7)
    with torch.no_grad():
        for i, (_, _, gate) in enumerate(gated_layers(model)):
            gate.score.fill_(0.12 + 0.01 * (i % 5))
    before = unfitted.extra_loss(model, 1)  # what every run used before normalisation
    default = unfitted.for_epochs(3, set())  # the default run: 3 epochs, warm-up 1
    assert default.penalty_scale == 1.0 and default.config == unfitted.config
    assert torch.equal(default.extra_loss(model, 1), before)  # bit-identical
    assert default.extra_loss(model, 0) is None  # the warm-up
    ten = unfitted.for_epochs(10, set())  # 9 penalised epochs share what 2 did
    assert ten.penalty_scale == pytest.approx(2 / 9)
    assert ten.extra_loss(model, 1).item() == pytest.approx(before.item() * 2 / 9, rel=1e-6)
    assert 9 * ten.penalty_scale == pytest.approx(2 * default.penalty_scale)
    one = unfitted.for_epochs(1, set())  # warm-up shortened to 0: one penalised epoch
    assert one.config.warmup_epochs == 0 and one.penalty_scale == 2.0
    late = get_method("taps", warmup_epochs=4).for_epochs(10, {"warmup_epochs"})
    assert late.penalty_scale == pytest.approx(2 / 6)


# ------------------------------------------------------------------- clipping and divergence


def toy_data() -> TensorDataset:
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(32) % CLASSES
    images = torch.randn(32, 3, IMG, IMG, generator=gen) * 0.5
    images[torch.arange(32), labels] += 1.0
    return TensorDataset(images, labels)


def test_clip_grad_bounds_each_step(bases):
    base_state = bases["test_vit"]
    moved = {}
    for clip in (None, 0.0, 1e-9):
        method = get_method("finetune")
        model, head = task_model("test_vit", base_state)
        method.prepare(model, head)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        fit(model, method, toy_data(), None, TrainConfig(
            epochs=1, batch_size=8, lr=1.0, optimizer="sgd", clip_grad=clip))
        moved[clip] = max((p.detach() - before[n]).abs().max().item()
                          for n, p in model.named_parameters())
    # SGD with momentum: 4 steps of at most lr × 1e-9 each, momentum summing at most 4 of them.
    assert moved[1e-9] < 1e-7 and moved[None] > 1e-2
    assert moved[0.0] == moved[None]  # 0: no clipping
    with pytest.raises(MethodError, match="clip_grad must be >= 0"):
        TrainConfig(clip_grad=-1.0)


def test_a_diverging_fit_stops_with_one_line_naming_epoch_and_step(bases):
    base_state = bases["test_vit"]
    method = get_method("finetune")
    model, head = task_model("test_vit", base_state)
    method.prepare(model, head)
    with pytest.raises(TrainingDiverged) as info:
        fit(model, method, toy_data(), None, TrainConfig(epochs=2, batch_size=8, lr=1e6))
    message = str(info.value)
    assert "\n" not in message and isinstance(info.value, MethodError)
    assert message.startswith("training diverged at epoch 1, step ")
    assert message.endswith(": lower --lr or set --clip-grad")


def test_collapse_is_decided_by_the_loss_of_guessing():
    chance = math.log(10)
    assert collapsed(chance, 0.4 * chance, 10)  # had learnt, back at ln C
    assert collapsed(2 * chance, 0.1, 10)
    assert not collapsed(0.99 * chance, 0.1, 10)  # still better than guessing
    assert not collapsed(chance, 0.6 * chance, 10)  # never learnt: a hard task, not a collapse
    assert not collapsed(5.0, 0.0, 1)  # one class: no chance level


def test_a_run_that_learns_and_collapses_to_chance_with_a_finite_loss_stops(bases, monkeypatch):
    """A finite-loss collapse (a constant prediction after the run had learnt) is stopped like a
    non-finite loss, never kept: from epoch 2's last step on, the head here predicts class 0
    whatever the input."""

    class Collapsing(type(get_method("finetune"))):
        def after_step(self, model: nn.Module, epoch: int) -> None:
            if epoch >= 2:
                with torch.no_grad():
                    model.head.weight.zero_()
                    model.head.bias.copy_(torch.tensor([10.0] + [0.0] * (CLASSES - 1)))

    monkeypatch.setattr(fit_module, "LOSS_EMA", 1.0)  # the running mean is the last batch's loss
    model, head = task_model("test_vit", bases["test_vit"])
    method = Collapsing(get_method("finetune").config)
    method.prepare(model, head)
    with pytest.raises(TrainingDiverged) as info:
        fit(model, method, toy_data(), None, TrainConfig(epochs=6, batch_size=8, lr=1e-2))
    message = str(info.value)
    assert "\n" not in message
    assert re.fullmatch(r"training diverged at epoch 3, step 4 \(loss [\d.]+ back at chance, ln "
                        rf"{CLASSES} = [\d.]+, after [\d.e-]+\): lower --lr or set --clip-grad",
                        message), message
    # the same run without the collapse trains through
    model, head = task_model("test_vit", bases["test_vit"])
    plain = get_method("finetune")
    plain.prepare(model, head)
    history = fit(model, plain, toy_data(), None,
                  TrainConfig(epochs=6, batch_size=8, lr=1e-2)).history
    assert len(history) == 6 and history[-1]["train_loss"] < 0.5 * math.log(CLASSES)


def test_a_huge_learning_rate_fails_in_one_line_and_leaves_nothing(tmp_path, image_data, capsys):
    home = str(tmp_path / "home")
    with Manager(home) as m:
        m.add_base("b", "timm:test_efficientnet")
        before = m.registry.list_artifacts()
    code, _, err = run(capsys, "--home", home, "task", "add", "t", "--base", "b", "--data",
                       f"imagefolder:{image_data}", "--method", "lora", "--lr", "1e6",
                       "--epochs", "2", "--batch-size", "16", "--img-size", "32")
    assert code == 1
    assert_one_line_error(
        err, r"training diverged at epoch 1, step \d+ \(loss [^)]+\): lower --lr or set "
             r"--clip-grad")
    with Manager(home) as m:
        assert m.list_tasks() == [] and m.registry.list_artifacts() == before
