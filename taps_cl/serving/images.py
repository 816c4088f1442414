"""What an inference request carries, decoded: images, the tasks each goes through, options.

Two encodings are accepted (docs/serving.md): an Open Inference Protocol (KServe V2) request,
JSON with the images as base64 strings in a `BYTES` input, and multipart/form-data with the
images as file parts. Only PNG and JPEG are decoded, and each image is decoded in full here,
before it reaches the model, so a truncated or foreign file fails its own request with a 4xx
instead of failing a mixed batch. Nothing here imports torch or FastAPI.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

from PIL import Image, UnidentifiedImageError

from taps_cl.errors import TapsError

# Decoded pixels per image at most (checked from the header, before decoding): a small PNG can
# expand to gigabytes; 4096 × 4096 is far beyond any backbone's input size.
MAX_PIXELS = 4096 * 4096
TOP_K = 3  # classes per image and task unless the request asks for another number
OUTPUTS = ("logits", "probabilities", "classes")  # the outputs of a single-task response
FORMATS = ("PNG", "JPEG")
_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff")
_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError,
                  Image.DecompressionBombError)


class RequestError(TapsError):
    """A request the server refuses: `status` is the HTTP status its JSON error carries."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    """Bounds on one request."""

    max_images: int  # images per request (the server's --max-batch)
    max_pixels: int = MAX_PIXELS  # pixels per decoded image


@dataclass
class Decoded:
    """A decoded request: its images, per image the tasks to run (None: the route's task), the
    number of top classes, the outputs asked for (None: all) and the id to echo."""

    images: list[Image.Image]
    tasks: Optional[list[list[str]]]
    top_k: int = TOP_K
    outputs: Optional[list[str]] = None
    id: Optional[str] = None


def decode_image(data: bytes, where: str, limits: Limits) -> Image.Image:
    """PNG or JPEG bytes → a fully decoded PIL image; RequestError naming `where` otherwise."""
    if not data.startswith(_MAGIC):
        raise RequestError(f"{where} is not a PNG or JPEG image")
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
        width, height = image.size
        if width * height > limits.max_pixels:
            raise RequestError(f"{where} has {width}×{height} pixels; at most "
                               f"{limits.max_pixels:,} are accepted", status=413)
        image.load()  # decode everything now: a truncated file fails here, not in the batch
    except RequestError:
        raise
    except _DECODE_ERRORS as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RequestError(f"cannot decode {where}: {reason}") from None
    return image


def decode_base64(text: str, where: str) -> bytes:
    """Strict base64 (an optional `data:…;base64,` prefix is dropped) → bytes."""
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"{where} is not valid base64") from None


def parse_json(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object (400 for malformed JSON, 422 for another value)."""
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(f"malformed JSON: {exc}") from None
    except RecursionError:
        raise RequestError("malformed JSON: nested too deeply") from None
    if not isinstance(doc, dict):
        raise RequestError("the request must be a JSON object (an inference request)", 422)
    return doc


def decode_v2(doc: dict[str, Any], limits: Limits, multi: bool) -> Decoded:
    """An inference request (KServe V2 JSON) → Decoded.

    Single task: one `BYTES` input, shape [N] or [N, 1], N base64 images. Multi-task: an input
    `images` as above and an input `tasks` (`BYTES`, shape [N] or [1]): per image (or for all)
    a comma-separated list of task names. `parameters.top_k` and `outputs` are optional."""
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise RequestError("'inputs' must be a non-empty list of input tensors", 422)
    named = {_field(t, "name", str, "an input"): t for t in inputs}
    if len(named) != len(inputs):
        raise RequestError("input names must be distinct", 422)
    if multi:
        unknown = sorted(set(named) - {"images", "tasks"})
        if unknown or "images" not in named or "tasks" not in named:
            raise RequestError("a multi-task request has two inputs, 'images' and 'tasks' "
                               f"(got {sorted(named)})", 422)
        images = _bytes_input(named["images"], limits.max_images)
        tasks = task_lists(_bytes_input(named["tasks"], limits.max_images), len(images))
    else:
        if len(inputs) != 1:
            raise RequestError(f"expected one input, the images (got {sorted(named)})", 422)
        images, tasks = _bytes_input(inputs[0], limits.max_images), None
    decoded = [decode_image(decode_base64(s, f"image {i}"), f"image {i}", limits)
               for i, s in enumerate(images)]
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise RequestError("'parameters' must be an object", 422)
    rid = doc.get("id")
    if rid is not None and not isinstance(rid, str):
        raise RequestError("'id' must be a string", 422)
    return Decoded(decoded, tasks, top_k(params.get("top_k", TOP_K)),
                   None if multi else requested_outputs(doc.get("outputs")), rid)


def decode_form(files: Sequence[tuple[str, bytes]], fields: dict[str, list[str]],
                limits: Limits, multi: bool) -> Decoded:
    """multipart/form-data → Decoded: every file part is an image, in order; fields `top_k`,
    `id` and (multi-task) `tasks`, once for all images or once per image."""
    allowed = {"top_k", "id"} | ({"tasks"} if multi else set())
    unknown = sorted(set(fields) - allowed)
    if unknown:
        raise RequestError(f"unknown form field(s) {', '.join(unknown)} (expected image files"
                           f" and {', '.join(sorted(allowed))})", 422)
    if not files:
        raise RequestError("no image file in the form", 422)
    if len(files) > limits.max_images:
        raise RequestError(f"{len(files)} images in one request; at most {limits.max_images}",
                           413)
    images = [decode_image(data, f"file {name!r}", limits) for name, data in files]
    tasks = None
    if multi:
        if "tasks" not in fields:
            raise RequestError("a multi-task form needs a 'tasks' field (e.g. tasks=a,b)", 422)
        tasks = task_lists(fields["tasks"], len(images))
    single = {k: v[-1] for k, v in fields.items() if k != "tasks"}
    return Decoded(images, tasks, top_k(single.get("top_k", TOP_K)), None, single.get("id"))


def task_lists(values: Sequence[str], n: int) -> list[list[str]]:
    """Comma-separated task names, one string per image or one for all `n` images."""
    if len(values) not in (1, n):
        raise RequestError(f"'tasks' has {len(values)} entries for {n} images: give one for "
                           "all images or one per image", 422)
    lists = []
    for value in values:
        names = [t.strip() for t in value.split(",") if t.strip()]
        if not names:
            raise RequestError("every image needs at least one task", 422)
        lists.append(list(dict.fromkeys(names)))  # a task named twice runs once
    return lists * n if len(lists) == 1 else lists


def top_k(value: Any) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RequestError(f"top_k must be a positive integer, not {value!r}", 422)
    return value


def requested_outputs(value: Any) -> Optional[list[str]]:
    """The names in a V2 request's `outputs` (None: every output)."""
    if value is None:
        return None
    if not isinstance(value, list) or not value:
        raise RequestError("'outputs' must be a non-empty list of {\"name\": …}", 422)
    names = [_field(o, "name", str, "an output") for o in value]
    unknown = sorted(set(names) - set(OUTPUTS))
    if unknown:
        raise RequestError(f"unknown output(s) {', '.join(unknown)} (outputs: "
                           f"{', '.join(OUTPUTS)})", 422)
    return names


def _bytes_input(tensor: dict[str, Any], max_items: int) -> list[str]:
    """A `BYTES` input tensor's strings, checked against its shape."""
    name = tensor["name"]
    datatype = _field(tensor, "datatype", str, f"input {name!r}")
    if datatype != "BYTES":
        raise RequestError(f"input {name!r} has datatype {datatype}; expected BYTES "
                           "(base64-encoded PNG or JPEG images, or task names)", 422)
    shape = _field(tensor, "shape", list, f"input {name!r}")
    if (not shape or len(shape) > 2 or any(isinstance(d, bool) or not isinstance(d, int)
                                           or d < 1 for d in shape)
            or (len(shape) == 2 and shape[1] != 1)):
        raise RequestError(f"input {name!r} has shape {shape}; expected [N] or [N, 1]", 422)
    if shape[0] > max_items:
        raise RequestError(f"{shape[0]} items in input {name!r}; at most {max_items} per "
                           "request", 413)
    data = _flatten(_field(tensor, "data", list, f"input {name!r}"))
    if len(data) != math.prod(shape):
        raise RequestError(f"input {name!r} has {len(data)} items for shape {shape}", 422)
    if not all(isinstance(item, str) for item in data):
        raise RequestError(f"input {name!r}: every item must be a string", 422)
    return data


def _flatten(data: list[Any]) -> list[Any]:
    """Row-major items of a flat or [N, 1]-nested data list (deeper nesting stays, and fails
    the item check)."""
    flat: list[Any] = []
    for item in data:
        flat.extend(item if isinstance(item, list) else [item])
    return flat


def _field(obj: Any, key: str, kind: type, what: str) -> Any:
    if not isinstance(obj, dict):
        raise RequestError(f"{what} must be an object", 422)
    value = obj.get(key)
    if not isinstance(value, kind):
        raise RequestError(f"{what} needs '{key}' ({kind.__name__})", 422)
    return value
