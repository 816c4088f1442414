"""Compact TAPS: low-rank gated deltas, the stored-size penalty, a budget, rounding."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.data import TensorDataset

from taps_cl import serialization
from taps_cl.errors import MethodError
from taps_cl.methods.catalog import get_method, stored_method
from taps_cl.methods.gates import LowRankTapsGate, TapsGate, gate_of, gated_layers
from taps_cl.methods.layers import adaptable_layers, norm_layers
from taps_cl.methods.merging import merge_state
from taps_cl.methods.taps import BUDGET_LAM_FLOOR, BUDGET_RATE, FACTOR_LR_SCALE
from taps_cl.models import backbones
from taps_cl.training.fit import TrainConfig, fit
from tests.test_methods import CLASSES, IMG, make_base, make_timm, task_model

# Small enough that the tiny timm test models have layers worth factorising.
COMPACT = {"rank": 2, "factor_min_params": 1000}


@pytest.fixture(scope="module")
def bases() -> dict[str, dict]:
    return {arch: make_base(arch) for arch in ("test_efficientnet", "test_vit")}


def prepared(arch: str, base_state: dict, **options) -> tuple:
    method = get_method("taps", **options)
    model, head = task_model(arch, base_state)
    torch.manual_seed(7)  # the factors A
    return method, method.prepare(model, head), head


def train_steps(method, model: nn.Module, steps: int = 3, lr: float = 2e-2) -> None:
    optimizer = torch.optim.AdamW(method.param_groups(model, lr, 0.0))
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(8, 3, IMG, IMG, generator=gen)
    y = torch.randint(0, CLASSES, (8,), generator=gen)
    for _ in range(steps):
        model.train()
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def eval_out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


def restored(arch: str, base_state: dict, tensors: dict, head: frozenset[str]) -> nn.Module:
    model = make_timm(arch, CLASSES)
    model.load_state_dict(merge_state(base_state, tensors, head), strict=True)
    return model


def expect_factorised(module: nn.Module, rank: int, min_params: int) -> bool:
    """The rule of taps_cl/methods/taps.py, written out independently of the implementation."""
    w = module.weight
    out, rest = w.shape[0], w[0].numel()
    return (getattr(module, "groups", 1) == 1 and w.numel() >= min_params
            and rank * (out + rest) < w.numel())


def norms_and_head_numbers(model: nn.Module, head: frozenset[str]) -> int:
    state = model.state_dict()
    keys = {f"{n}.{k}" if n else k for n, m in norm_layers(model) for k in m.state_dict()}
    return sum(state[k].numel() for k in keys | set(head))


# ----------------------------------------------------------------------------- factor shapes


def test_factor_shapes_start_at_the_base_and_follow_the_seed(bases):
    base_state = bases["test_efficientnet"]
    plain, _ = task_model("test_efficientnet", base_state)
    method, model, head = prepared("test_efficientnet", base_state, **COMPACT)

    low_rank = 0
    for name, module in adaptable_layers(model, head):
        gate = gate_of(module)
        weight = module.parametrizations.weight.original
        if expect_factorised(module, 2, 1000):
            low_rank += 1
            assert isinstance(gate, LowRankTapsGate), name
            rest = weight[0].numel()
            assert gate.factor_b.shape == (weight.shape[0], 2)
            assert gate.factor_a.shape == (2, rest)
            assert torch.count_nonzero(gate.factor_b) == 0
            assert gate.factor_a.std().item() == pytest.approx(1 / math.sqrt(rest), rel=0.35)
        else:
            assert type(gate) is TapsGate, name
            assert gate.delta.shape == weight.shape
    assert 0 < low_rank < len(adaptable_layers(model, head))

    # B = 0: the gated model is exactly the base with the new head.
    x = torch.randn(4, 3, IMG, IMG)
    torch.testing.assert_close(eval_out(model, x), eval_out(plain, x), atol=0, rtol=0)

    # A is drawn from torch's RNG: the same seed gives the same factors.
    _, again, _ = prepared("test_efficientnet", base_state, **COMPACT)
    for (_, _, g1), (_, _, g2) in zip(gated_layers(model), gated_layers(again)):
        if isinstance(g1, LowRankTapsGate):
            assert torch.equal(g1.factor_a, g2.factor_a)


def test_small_and_depthwise_layers_keep_full_deltas(bases):
    base_state = bases["test_efficientnet"]
    method, model, head = prepared("test_efficientnet", base_state, rank=8,
                                   factor_min_params=1000)
    kinds = {name: type(gate) for name, _, gate in gated_layers(model)}
    assert kinds["blocks.3.0.conv_dw"] is TapsGate  # depthwise (groups = 128)
    assert kinds["conv_stem"] is TapsGate  # 648 weights < factor_min_params
    # 1024 weights, but a rank-8 factor would store 8·(8 + 128) = 1088 numbers.
    assert kinds["blocks.3.0.se.conv_reduce"] is TapsGate
    assert kinds["conv_head"] is LowRankTapsGate  # 8·(256 + 64) = 2560 < 16384

    state = method.extract(model, head)
    by_name = {r.name: r for r in state.layers}
    assert "delta/blocks.3.0.conv_dw.weight" in state.tensors
    assert {"factor_b/conv_head.weight", "factor_a/conv_head.weight"} <= set(state.tensors)
    assert "delta/conv_head.weight" not in state.tensors
    assert by_name["conv_head"].task_params == 2560 and by_name["conv_head"].base_params == 16384
    assert by_name["blocks.3.0.conv_dw"].task_params == 1152

    # rank 0 is the paper's TAPS: a full delta everywhere, no factor group.
    paper, full, _ = prepared("test_efficientnet", base_state, rank=0)
    assert all(type(g) is TapsGate for _, _, g in gated_layers(full))
    assert [g["name"] for g in paper.param_groups(full, 1e-3, 0.0)] == ["task", "scores"]


def test_factors_train_at_their_own_learning_rate(bases):
    method, model, _ = prepared("test_efficientnet", bases["test_efficientnet"], **COMPACT)
    groups = {g["name"]: g for g in method.param_groups(model, 1e-3, 0.01)}
    assert groups["factors"]["lr"] == pytest.approx(FACTOR_LR_SCALE * 1e-3)
    assert groups["task"]["lr"] == 1e-3 and groups["scores"]["weight_decay"] == 0.0
    factors = {id(p) for _, _, g in gated_layers(model) if isinstance(g, LowRankTapsGate)
               for p in (g.factor_a, g.factor_b)}
    assert {id(p) for p in groups["factors"]["params"]} == factors
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(len(g["params"]) for g in groups.values()) == len(trainable)

    own = get_method("taps", factor_lr=3e-2, **COMPACT)
    own.prepare(*task_model("test_efficientnet", bases["test_efficientnet"]))
    assert {g["name"]: g["lr"] for g in own.param_groups(model, 1e-3, 0.0)}["factors"] == 3e-2


# ------------------------------------------------------------------------------- exact fold


@pytest.mark.parametrize("arch", ["test_efficientnet", "test_vit"])
def test_fold_restores_the_trained_model(arch, bases):
    base_state = bases[arch]
    method, model, head = prepared(arch, base_state, lam=0.0, **COMPACT)
    train_steps(method, model)
    gates = gated_layers(model)
    assert any(isinstance(g, LowRankTapsGate) and g.factor_b.abs().sum() > 0 for _, _, g in gates)
    x = torch.randn(4, 3, IMG, IMG)

    for switch_off in (False, True):
        if switch_off:  # every other gate off; their deltas and factors are non-zero but unused
            with torch.no_grad():
                for _, _, gate in gates[::2]:
                    gate.score.fill_(0.05)
        state = method.extract(model, head)
        assert state.exact
        plain = restored(arch, base_state, state.tensors, head)
        assert type(plain) is type(make_timm(arch, 1))
        assert not any("parametrizations" in k for k in plain.state_dict())
        torch.testing.assert_close(eval_out(plain, x), eval_out(model, x), atol=1e-5, rtol=0)
        # The fold is exact: each restored weight is the weight the trained model computes.
        plain_state = plain.state_dict()
        for name, module, gate in gates:
            if isinstance(gate, LowRankTapsGate) and gate.is_active():
                assert torch.equal(plain_state[f"{name}.weight"], module.weight.detach()), name
    assert 0 < state.active_layers < len(state.layers)


def test_inactive_layers_store_nothing_and_records_count_what_is_stored(bases):
    base_state = bases["test_vit"]
    method, model, head = prepared("test_vit", base_state, **COMPACT)
    layers = gated_layers(model)
    with torch.no_grad():
        for _, _, gate in layers[1::3]:
            gate.score.fill_(0.0)
    state = method.extract(model, head)

    for record, (name, module, gate) in zip(state.layers, layers):
        key = f"{name}.weight"
        stored = {k for k in state.tensors if k.endswith("/" + key)}
        if not record.active:
            assert stored == set() and record.task_params == 0
        elif isinstance(gate, LowRankTapsGate):
            out, rest = module.parametrizations.weight.original.shape[0], gate.factor_a.shape[1]
            assert stored == {f"factor_b/{key}", f"factor_a/{key}"}
            assert record.task_params == 2 * (out + rest) < record.base_params
        else:
            assert stored == {f"delta/{key}"} and record.task_params == record.base_params
    assert any(not r.active for r in state.layers)
    assert state.num_params == method.stored_params(model, head)
    assert state.num_params == (norms_and_head_numbers(model, head)
                                + sum(r.task_params for r in state.layers))


# ------------------------------------------------------------------------ gradient, penalty


def test_straight_through_score_gradient_is_inner_product_with_ba(bases):
    method, model, head = prepared("test_vit", bases["test_vit"], **COMPACT)
    low = [(m, g) for _, m, g in gated_layers(model) if isinstance(g, LowRankTapsGate)]
    (off_module, off), (on_module, on) = low[2], low[5]
    with torch.no_grad():
        off.factor_b.normal_(0, 0.1)
        on.factor_b.normal_(0, 0.1)
        off.score.fill_(0.05)  # below tau
    x, y = torch.randn(4, 3, IMG, IMG), torch.tensor([0, 1, 2, 0])
    model.train()
    # cached(): each effective weight is computed once, so autograd can differentiate by it.
    with parametrize.cached():
        w_off, w_on = off_module.weight, on_module.weight
        loss = F.cross_entropy(model(x), y)
        grads = torch.autograd.grad(
            loss, [w_off, w_on, off.score, on.score, off.factor_b, off.factor_a]
        )
    g_off, g_on, s_off, s_on, b_off, a_off = grads
    for g_w, gate, g_s in ((g_off, off, s_off), (g_on, on, s_on)):
        ba = gate.delta_weight(g_w.shape).detach()
        expected = (g_w.double() * ba.double()).sum().item()
        assert abs(expected) > 1e-7
        assert g_s.item() == pytest.approx(expected, rel=1e-4)
    # Off: no gradient reaches the factors themselves.
    assert b_off.abs().sum() == 0 and a_off.abs().sum() == 0


def test_params_penalty_weighs_gates_by_what_they_would_store(bases):
    base_state = bases["test_efficientnet"]
    method, model, head = prepared("test_efficientnet", base_state, penalty="params", lam=2.0,
                                   warmup_epochs=0, **COMPACT)
    sizes = []
    for _, module, gate in gated_layers(model):
        w = module.parametrizations.weight.original
        factor = 2 * (w.shape[0] + w[0].numel())
        sizes.append(factor if isinstance(gate, LowRankTapsGate) else w.numel())
    sizes = torch.tensor(sizes, dtype=torch.float64)
    weights = method.penalty_weights(model)
    torch.testing.assert_close(weights, (sizes / sizes.sum()).float())
    assert weights.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert method.extra_loss(model, 0).item() == pytest.approx(2.0 * 0.15, rel=1e-5)

    uniform = get_method("taps", **COMPACT).penalty_weights(model)
    torch.testing.assert_close(uniform, torch.full((len(sizes),), 1 / len(sizes)))


# ---------------------------------------------------------------------------------- budget


def test_budget_below_norms_and_head_is_refused_naming_the_minimum(bases):
    base_state = bases["test_efficientnet"]
    model, head = task_model("test_efficientnet", base_state)
    base_numbers = sum(p.numel() for n, p in model.named_parameters() if n not in head)
    minimum = norms_and_head_numbers(model, head) / base_numbers
    assert 0.03 < minimum < 0.1  # BatchNorm statistics and num_batches_tracked are counted

    method = get_method("taps", budget=minimum * 0.9)
    with pytest.raises(MethodError) as info:
        method.prepare(model, head)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"taps: --budget {minimum * 0.9:g} is below what this task needs "
                              "for norms and head alone (")
    named = float(message.split("(")[1].split("×")[0])
    assert named == pytest.approx(math.ceil(minimum * 1e4) / 1e4)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())  # nothing changed

    accepted = get_method("taps", budget=named, **COMPACT)
    accepted.prepare(model, head)


def test_finalize_switches_off_lowest_score_per_stored_number_until_the_task_fits(bases, caplog):
    base_state = bases["test_vit"]
    method, model, head = prepared("test_vit", base_state, budget=0.03, **COMPACT)
    gates = gated_layers(model)
    with torch.no_grad():  # distinct scores, all on
        for i, (_, _, gate) in enumerate(gates):
            gate.score.fill_(0.1 + 0.01 * ((7 * i) % len(gates)) + 0.001)
    base_numbers = method._base_params
    limit = 0.03 * base_numbers
    assert method.stored_params(model, head) > limit

    order = sorted(gates, key=lambda t: float(t[2].score.detach()) / t[2].stored_numel())
    expected_off, size = [], method.stored_params(model, head)
    for name, _, gate in order:
        if size <= limit:
            break
        expected_off.append(name)
        size -= gate.stored_numel()

    with caplog.at_level(logging.INFO, logger="taps_cl.methods.taps"):
        method.finalize(model)
    off = [name for name, _, gate in gates if not gate.is_active()]
    assert sorted(off) == sorted(expected_off) and off
    assert method.stored_params(model, head) <= limit
    for name, _, gate in gates:
        if name in off:
            assert float(gate.score.detach()) < 0.1 and gate.gate().item() == 0.0
    assert ", ".join(expected_off) in caplog.text

    state = method.extract(model, head)
    assert {r.name for r in state.layers if not r.active} == set(off)
    assert all(r.score < method.config.tau for r in state.layers if not r.active)
    assert state.num_params <= limit
    x = torch.randn(2, 3, IMG, IMG)
    plain = restored("test_vit", base_state, state.tensors, head)
    torch.testing.assert_close(eval_out(plain, x), eval_out(model, x), atol=1e-5, rtol=0)


def test_dual_ascent_raises_lambda_over_budget_and_lowers_it_to_its_floor(bases):
    base_state = bases["test_vit"]
    method, model, head = prepared("test_vit", base_state, budget=0.03, lam=0.0,
                                   warmup_epochs=1, **COMPACT)
    assert method.lam == BUDGET_LAM_FLOOR
    method.after_step(model, 0)  # warm-up: λ unchanged
    assert method.lam == BUDGET_LAM_FLOOR
    over = method.stored_params(model, head) / (0.03 * method._base_params) - 1
    method.after_step(model, 1)
    assert method.lam == pytest.approx(BUDGET_LAM_FLOOR * math.exp(BUDGET_RATE * min(over, 1)))
    for _ in range(30):
        method.after_step(model, 1)
    assert method.lam == pytest.approx(BUDGET_LAM_FLOOR * math.exp(31 * BUDGET_RATE * min(over, 1)))
    assert method.lam > 5 * BUDGET_LAM_FLOOR
    penalty = method.extra_loss(model, 1)
    assert penalty.item() == pytest.approx(method.lam * 0.15, rel=1e-5)

    with torch.no_grad():  # now well under the budget: λ falls back, never below its floor
        for _, _, gate in gated_layers(model):
            gate.score.fill_(0.0)
    for _ in range(200):
        method.after_step(model, 1)
    assert method.lam == BUDGET_LAM_FLOOR

    # Without a budget λ is config.lam and never moves.
    plain = get_method("taps", lam=0.5)
    plain.prepare(*task_model("test_vit", base_state))
    plain.after_step(model, 3)
    assert plain.lam == 0.5


def test_budget_is_met_after_a_short_fit(bases, caplog):
    base_state = bases["test_efficientnet"]
    method, model, head = prepared("test_efficientnet", base_state, budget=0.09,
                                   warmup_epochs=1, **COMPACT)
    limit = 0.09 * method._base_params
    all_on = method.stored_params(model, head)
    assert all_on > 1.4 * limit

    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(48) % CLASSES
    images = torch.randn(48, 3, IMG, IMG, generator=gen) * 0.5
    images[torch.arange(48), labels] += 1.0
    with caplog.at_level(logging.INFO, logger="taps_cl.methods.taps"):
        result = fit(model, method, TensorDataset(images, labels), None,
                     TrainConfig(epochs=6, batch_size=8, lr=1e-2))
        method.finalize(model)
    assert method.lam > method.config.lam  # fit called after_step: dual ascent raised λ
    assert "λ" in caplog.text
    active = [row["active_layers"] for row in result.history]
    assert active[-1] < active[0]
    assert method.stored_params(model, head) <= limit

    state = method.extract(model, head)
    assert state.num_params == method.stored_params(model, head) <= limit
    x = torch.randn(4, 3, IMG, IMG)
    plain = restored("test_efficientnet", base_state, state.tensors, head)
    torch.testing.assert_close(eval_out(plain, x), eval_out(model, x), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------- precision


def test_rounded_storage_round_trips_and_is_marked_inexact(bases):
    arch = "test_efficientnet"
    base_state = bases[arch]
    method, model, head = prepared(arch, base_state, lam=0.0, store_dtype="bfloat16",
                                   store_norms_head_dtype="bfloat16", **COMPACT)
    train_steps(method, model)
    state = method.extract(model, head)
    assert not state.exact
    for name, tensor in state.tensors.items():
        if name.endswith("num_batches_tracked"):
            assert tensor.dtype == torch.int64, name
        else:
            assert tensor.dtype == torch.bfloat16, name

    # Through the artifact format and back, then rebuilt the way the manager rebuilds a task.
    loaded = serialization.from_bytes(serialization.to_bytes(state.tensors, {"task": "t"}))
    assert loaded.keys() == state.tensors.keys()
    assert all(torch.equal(loaded[k], v) and loaded[k].dtype == v.dtype
               for k, v in state.tensors.items())
    merged = merge_state(base_state, loaded, head)
    assert all(merged[k].dtype == base_state[k].dtype for k in merged)
    rebuilt = backbones.create_model(f"timm:{arch}", num_classes=CLASSES)
    backbones.apply_weights(rebuilt, merged)

    # The rebuilt model is the trained model with its stored tensors rounded — nothing else.
    x = torch.randn(4, 3, IMG, IMG)
    trained = eval_out(model, x)
    with torch.no_grad():
        for _, _, gate in gated_layers(model):
            for p in gate.parameters():
                if p is not gate.score:
                    p.copy_(p.to(torch.bfloat16).float())
        for _, module in norm_layers(model):
            for t in list(module.parameters()) + list(module.buffers()):
                if t.is_floating_point():
                    t.copy_(t.to(torch.bfloat16).float())
        for n, p in model.named_parameters():
            if n in head:
                p.copy_(p.to(torch.bfloat16).float())
    rounded = eval_out(model, x)
    torch.testing.assert_close(eval_out(rebuilt, x), rounded, atol=1e-5, rtol=0)
    assert (trained - rounded).abs().max() > 0  # the rounding did change the model

    only_deltas = get_method("taps", store_dtype="float16", **COMPACT)
    only_deltas.prepare(*task_model(arch, base_state))
    state16 = only_deltas.extract(model, head)
    assert not state16.exact
    assert all(v.dtype == torch.float16 for k, v in state16.tensors.items()
               if k.startswith(("delta/", "factor_")))
    assert all(v.dtype in (torch.float32, torch.int64) for k, v in state16.tensors.items()
               if k.startswith("set/"))


# ------------------------------------------------------------------------- config, merging


def test_compact_config_is_json_and_defaults_to_rank_8():
    default = get_method("taps").config
    assert (default.rank, default.factor_min_params, default.factor_lr, default.budget) == (
        8, 20000, None, None)
    assert default.store_dtype == default.store_norms_head_dtype == "float32"
    method = get_method("taps", rank=4, budget=0.1, factor_lr=5e-3, store_dtype="bfloat16")
    cfg = method.config_dict()
    assert json.loads(json.dumps(cfg)) == cfg
    assert get_method("taps", **cfg).config == method.config
    assert get_method("taps", budget=1).config.budget == 1.0


def test_a_stored_config_from_before_compact_mode_restores_full_deltas():
    """Rank 8 became the default later: a task recorded without a rank trained full deltas and
    is restored with them; a recorded rank, or a new task's default, is left as it is."""
    old = {"lam": 1.0, "tau": 0.1, "score_init": 0.15, "score_lr": 0.01, "warmup_epochs": 1,
           "penalty": "layers"}
    assert stored_method("taps", old).config.rank == 0
    assert stored_method("taps", {**old, "rank": 4}).config.rank == 4
    assert stored_method("taps", {}).config == get_method("taps", rank=0).config
    assert get_method("taps").config.rank == 8
    assert stored_method("lora", {}).config == get_method("lora").config


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"rank": -1}, r"rank must be >= 0"),
        ({"rank": 2.5}, r"rank must be an integer"),
        ({"factor_min_params": -5}, r"factor_min_params must be >= 0"),
        ({"factor_lr": 0.0}, r"factor_lr must be > 0"),
        ({"factor_lr": float("inf")}, r"factor_lr must be a finite number"),
        ({"budget": 0}, r"budget must be > 0"),
        ({"budget": -0.1}, r"budget must be > 0"),
        ({"budget": float("inf")}, r"budget must be a finite number"),
        ({"budget": float("nan")}, r"budget must be a finite number"),
        ({"budget": "0.1"}, r"budget must be a number"),
        ({"store_dtype": "int8"}, r"store_dtype must be one of float32, bfloat16, float16"),
        ({"store_norms_head_dtype": "fp8"}, r"store_norms_head_dtype must be one of"),
    ],
)
def test_compact_config_errors(overrides, message):
    with pytest.raises(MethodError, match=message):
        get_method("taps", **overrides)


def test_merge_state_folds_factors_and_rejects_inconsistent_ones():
    base = {"a.weight": torch.ones(4, 2, 3, 3), "fc.weight": torch.zeros(5, 2),
            "bn.num_batches_tracked": torch.tensor(3)}
    head = frozenset({"fc.weight"})
    b, a = torch.randn(4, 2), torch.randn(2, 18)
    fc = {"set/fc.weight": torch.ones(3, 2, dtype=torch.bfloat16)}
    merged = merge_state(base, {"factor_b/a.weight": b.bfloat16(),
                                "factor_a/a.weight": a.bfloat16(), **fc}, head)
    expected = torch.ones(4, 2, 3, 3) + (b.bfloat16().float() @ a.bfloat16().float()).reshape(
        4, 2, 3, 3)
    assert torch.equal(merged["a.weight"], expected) and merged["a.weight"].dtype == torch.float32
    assert merged["fc.weight"].dtype == torch.float32  # set/ is cast to the base's type
    counted = merge_state(base, {"set/bn.num_batches_tracked": torch.tensor(9), **fc}, head)
    assert counted["bn.num_batches_tracked"].dtype == torch.int64

    cases = [
        ({"factor_b/a.weight": b}, r"'factor_b/a.weight' has no matching 'factor_a/a.weight'"),
        ({"factor_a/a.weight": a}, r"'factor_a/a.weight' has no matching 'factor_b/a.weight'"),
        ({"factor_b/a.weight": b, "factor_a/a.weight": torch.randn(3, 18)},
         r"disagree on the rank"),
        ({"factor_b/a.weight": torch.randn(4, 2, 1), "factor_a/a.weight": a}, r"rank"),
        ({"factor_b/a.weight": b, "factor_a/a.weight": torch.randn(2, 9)}, r"shape"),
        ({"factor_b/a.weight": torch.randn(3, 2), "factor_a/a.weight": torch.randn(2, 24)},
         r"shape"),
        ({"factor_b/x.weight": b, "factor_a/x.weight": a}, r"no matching base weight"),
        ({"factor_b/a.weight": b, "factor_a/a.weight": a,
          "delta/a.weight": torch.zeros(4, 2, 3, 3)}, r"both a delta and factors"),
        ({"factor_c/a.weight": b}, r"neither"),
    ]
    for tensors, message in cases:
        with pytest.raises(MethodError, match=message):
            merge_state(base, {**tensors, **fc}, head)
