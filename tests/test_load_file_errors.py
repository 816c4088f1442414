"""`taps_cl.load_file` on damaged or crafted exports: every kind of damage is a TapsError with
one line that names the file and what is wrong, never a raw ValueError, KeyError, RuntimeError
or TypeError. The exports start real (`restore --out` of tasks in the pre-reorganisation
fixture registry: `lin`, a linear probe, and `fu`, an AdapterFusion task reading `ad`)."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import torch
from safetensors import safe_open

import taps_cl
import taps_cl.serialization as serialization
from taps_cl.errors import TapsError
from taps_cl.manager import Manager

FIXTURE = Path(__file__).parent / "fixtures" / "registry_e113eb4"


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("exports")
    home = root / "home"
    shutil.copytree(FIXTURE, home)
    with Manager(home) as m:
        return {name: m.restore_to_file(name, root / f"{name}.safetensors")
                for name in ("lin", "fu")}


def contents(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata())


def craft(tmp_path: Path, export: Path, *,
          meta: Optional[Callable[[dict[str, str]], Any]] = None,
          tensors: Optional[Callable[[dict[str, torch.Tensor]], Any]] = None) -> Path:
    """A copy of `export` with its metadata (str → str) and/or tensors changed in place."""
    state, metadata = contents(export)
    if meta is not None:
        meta(metadata)
    if tensors is not None:
        tensors(state)
    out = tmp_path / f"crafted-{export.name}"
    # Metadata values pass as they are: to_bytes leaves strings alone.
    out.write_bytes(serialization.to_bytes(state, metadata))
    return out


def raw(tmp_path: Path, data: bytes) -> Path:
    out = tmp_path / "crafted.safetensors"
    out.write_bytes(data)
    return out


def assert_refused(path: Path, pattern: str) -> None:
    with pytest.raises(TapsError, match=pattern) as info:
        taps_cl.load_file(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message, message


def test_real_exports_load(exports):
    for name, classes in (("lin", 10), ("fu", 5)):
        model = taps_cl.load_file(exports[name])
        assert model(torch.zeros(1, 3, 32, 32)).shape == (1, classes)


# ------------------------------------------------------------------ not a safetensors file at all
@pytest.mark.parametrize("data, pattern", [
    (b"", r"not a safetensors file: 0 bytes"),
    (b"PK\x03\x04", r"not a safetensors file: 4 bytes"),
    (b"just some text, no tensors in here at all\n", r"not a safetensors file: .*header length"),
    (struct.pack("<Q", 40) + b"{not json at all, just braces and words}",
     r"not a safetensors file: its header is not JSON"),
    (struct.pack("<Q", 8) + b"[1,2,3] ", r"header is not a JSON object"),
    (struct.pack("<Q", 8) + b'"text"  ', r"header is not a JSON object"),
], ids=["empty", "zip-magic", "text", "header-not-json", "header-a-list", "header-a-string"])
def test_not_a_safetensors_file(tmp_path, data, pattern):
    assert_refused(raw(tmp_path, data), pattern)


def test_missing_file(tmp_path):
    assert_refused(tmp_path / "nowhere.safetensors", r"cannot read .*No such file")


def test_truncated_in_the_tensor_data(tmp_path, exports):
    blob = exports["lin"].read_bytes()
    assert_refused(raw(tmp_path, blob[:len(blob) // 2]), r"is truncated: its header describes")


def test_truncated_in_the_header(tmp_path, exports):
    blob = exports["lin"].read_bytes()
    assert_refused(raw(tmp_path, blob[:100]), r"is truncated or not a safetensors file")


def test_damaged_tensor_table(tmp_path, exports):
    blob = exports["lin"].read_bytes()
    (length,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + length])
    name = next(k for k in header if k != "__metadata__")
    header[name]["dtype"] = "NOT_A_DTYPE"
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    data = struct.pack("<Q", len(text)) + text + blob[8 + length:]
    assert_refused(raw(tmp_path, data), r"tensors cannot be read")


def test_metadata_not_a_string_map(tmp_path, exports):
    blob = exports["lin"].read_bytes()
    (length,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + length])
    header["__metadata__"]["num_classes"] = 10  # a number, not a string
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    data = struct.pack("<Q", len(text)) + text + blob[8 + length:]
    assert_refused(raw(tmp_path, data), r"metadata is not a map of strings")


# ------------------------------------------------------------------ metadata
@pytest.mark.parametrize("key", ["model", "num_classes"])
def test_missing_model_or_class_count(tmp_path, exports, key):
    path = craft(tmp_path, exports["lin"], meta=lambda m: m.pop(key))
    assert_refused(path, rf"not a model exported by taps-cl \(no {key} in its metadata\)")


@pytest.mark.parametrize("model, pattern", [
    ("timm:no_such_model_anywhere", r"metadata model: unknown timm model"),
    ("nosuchlib:resnet18", r"metadata model: unknown model source"),
    ("resnet18", r"metadata model: bad model spec"),
    ("timm:", r"metadata model: bad model name"),
], ids=["unknown-name", "unknown-source", "no-source", "empty-name"])
def test_unknown_model(tmp_path, exports, model, pattern):
    path = craft(tmp_path, exports["lin"], meta=lambda m: m.update(model=model))
    assert_refused(path, pattern)


@pytest.mark.parametrize("value", ["ten", "2.5", "0", "-3", "true", "[10]", "null", ""])
def test_num_classes_not_a_positive_int(tmp_path, exports, value):
    path = craft(tmp_path, exports["lin"], meta=lambda m: m.update(num_classes=value))
    assert_refused(path, r"num_classes (must be a positive integer|is not JSON)")


def test_num_classes_that_does_not_fit_the_head(tmp_path, exports):
    path = craft(tmp_path, exports["lin"], meta=lambda m: m.update(num_classes="7"))
    assert_refused(path, r"tensors do not fit .*7 classes.*shape-mismatched")


def test_unknown_method(tmp_path, exports):
    path = craft(tmp_path, exports["lin"], meta=lambda m: m.update(method="magic"))
    assert_refused(path, r"metadata method 'magic': unknown method 'magic'")


@pytest.mark.parametrize("value, pattern", [
    ('["fuse", "ad"]', r"method_config must be a JSON object of options, got list"),
    ('"fuse=ad"', r"method_config must be a JSON object of options, got str"),
    ("{fuse: ad", r"metadata method_config is not JSON"),
    ('{"fuse": ["ad"], "colour": "blue"}', r"has no option 'colour'"),
    ('{"fuse": ["ad"], "reduction": "wide"}', r"reduction must be an integer"),
    ('{"fuse": ["ad"], "reduction": [16]}', r"reduction must be an integer"),
], ids=["list", "string", "not-json", "unknown-option", "bad-value", "list-value"])
def test_method_config_malformed(tmp_path, exports, value, pattern):
    path = craft(tmp_path, exports["fu"], meta=lambda m: m.update(method_config=value))
    assert_refused(path, pattern)


@pytest.mark.parametrize("value, pattern", [
    ('{"name": "ad"}', r"dependencies must be a JSON list, got dict"),
    ("[oops", r"metadata dependencies is not JSON"),
    ('["ad"]', r"dependencies: entry 1 is not a JSON object"),
    ('[{"method": "adapter", "config": {}}]', r"dependencies: entry 1 has no name"),
    ('[{"name": "ad", "config": {}}]', r"dependencies: entry 1 has no method"),
    ('[{"name": "ad", "method": "adapter"}]', r"dependencies: entry 1 has no config"),
    ('[{"name": "ad", "method": "adapter", "config": [16]}]',
     r"dependencies: entry 1 has no config \(a JSON object\)"),
    ('[{"name": "other", "method": "adapter", "config": {}}]', r"fusion: expected the tasks ad"),
    ('[{"name": "ad", "method": "taps", "config": {}}]', r"fusion reads adapter tasks only"),
    ('[{"name": "ad", "method": "adapter", "config": {"width": 3}}]',
     r"adapter options this version does not know"),
    ('[{"name": "ad", "method": "adapter", "config": {"reduction": 0}}]', r"reduction"),
    ("[]", r"fusion: expected the tasks ad, got none"),
], ids=["dict", "not-json", "a-string", "no-name", "no-method", "no-config", "config-list",
        "wrong-task", "wrong-method", "unknown-option", "bad-option", "empty"])
def test_dependencies_malformed(tmp_path, exports, value, pattern):
    path = craft(tmp_path, exports["fu"], meta=lambda m: m.update(dependencies=value))
    assert_refused(path, pattern)


@pytest.mark.parametrize("changes, pattern", [
    ({"img_size": "big"}, r"metadata img_size is not JSON"),
    ({"img_size": "-1"}, r"img_size must be a positive integer"),
    ({"img_size": "null", "data_config": "{}"}, r"input size of the composed model is unknown"),
], ids=["img-size-not-json", "img-size-negative", "no-input-size"])
def test_input_size_malformed(tmp_path, exports, changes, pattern):
    path = craft(tmp_path, exports["fu"], meta=lambda m: m.update(changes))
    assert_refused(path, pattern)


# ------------------------------------------------------------------ tensors that do not fit
@pytest.mark.parametrize("name", ["lin", "fu"])
def test_missing_tensor(tmp_path, exports, name):
    def drop(state: dict[str, torch.Tensor]) -> None:
        del state[sorted(state)[0]]
    path = craft(tmp_path, exports[name], tensors=drop)
    assert_refused(path, r"tensors do not fit the model its metadata names .*1 missing")


@pytest.mark.parametrize("name", ["lin", "fu"])
def test_unexpected_tensor(tmp_path, exports, name):
    path = craft(tmp_path, exports[name],
                 tensors=lambda s: s.update({"extra.weight": torch.zeros(3)}))
    assert_refused(path, r"tensors do not fit .*1 unexpected \(extra.weight\)")


@pytest.mark.parametrize("name", ["lin", "fu"])
def test_wrong_shape(tmp_path, exports, name):
    def reshape(state: dict[str, torch.Tensor]) -> None:
        key = sorted(k for k, v in state.items() if v.dim() >= 1 and v.numel() > 1)[0]
        state[key] = torch.zeros(state[key].numel() + 1)
    path = craft(tmp_path, exports[name], tensors=reshape)
    assert_refused(path, r"tensors do not fit .*1 shape-mismatched")


def test_method_that_does_not_match_the_tensors(tmp_path, exports):
    # A fusion export relabelled as a linear probe: its fusion modules are unexpected keys.
    path = craft(tmp_path, exports["fu"], meta=lambda m: m.update(method="linear",
                                                                  method_config="{}"))
    assert_refused(path, r"tensors do not fit .*method linear.*unexpected \(taps_fusion")
