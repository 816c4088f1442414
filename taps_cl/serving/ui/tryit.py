"""Try it: an uploaded image checked, then every chosen task's top classes (`Manager.predict`).

The upload is checked before any model is built: it must decode as an image (Pillow, which also
refuses decompression bombs) and fit the app's body limit. The bytes go to a private temporary
file for `predict`, which reads images from files as `taps-cl predict` does, and the file is
removed afterwards whatever happens.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Sequence

from taps_cl.errors import TapsError
from taps_cl.manager import Manager

TOP_K = 3


class BadUpload(TapsError):
    """An upload the try-it page cannot use; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def too_large(size: int, limit: int) -> BadUpload:
    return BadUpload(f"the upload is {size:,} bytes; at most {limit:,} are accepted", 413)


def image_format(data: bytes) -> str:
    """The image format of `data` (e.g. "PNG"); BadUpload unless Pillow can decode it."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise BadUpload("no image was uploaded: choose an image file (PNG, JPEG, …)")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.verify()  # reads the whole file: a truncated one fails here
            fmt = image.format or "image"
        with Image.open(io.BytesIO(data)) as image:
            image.load()  # decodes the pixels, which verify() does not
    except Image.DecompressionBombError as exc:
        raise BadUpload(f"the image is too large to decode ({exc})", 413) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise BadUpload(f"the upload is not an image Pillow can read (PNG, JPEG, …): "
                        f"{type(exc).__name__}", 415) from None
    return fmt


def chosen_tasks(ready: Sequence[str], asked: Sequence[str], limit: int) -> list[str]:
    """The tasks to run, in sequence order: those asked for (all ready ones where none were, if
    there are at most `limit`); BadUpload naming an unknown task or too many."""
    if not ready:
        raise BadUpload("the base has no ready task to try")
    asked = [name for name in asked if name]
    unknown = sorted(set(asked) - set(ready))
    if unknown:
        raise BadUpload(f"no ready task {unknown[0]!r} on this base")
    names = [name for name in ready if name in set(asked)] if asked else list(ready)
    if len(names) > limit:
        raise BadUpload(f"{len(names):,} tasks chosen: try at most {limit} at once")
    return names


def predict_tasks(m: Manager, names: Sequence[str], data: bytes, fmt: str, top_k: int,
                  device: str) -> dict[str, list[tuple[str, float]]]:
    """Each task's top-k (class, probability) for the image `data`, as `Manager.predict`."""
    fd, path = tempfile.mkstemp(suffix="." + fmt.lower(), prefix="taps-cl-ui-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return {name: m.predict(name, [path], top_k=top_k, device=device)[0] for name in names}
    finally:
        os.unlink(path)
