"""Render a notMNIST-style letters dataset (an imagefolder) from installed TrueType fonts."""

from __future__ import annotations

import json
import logging
import random
import shutil
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter, ImageFont

from taps_cl.errors import DataError

log = logging.getLogger(__name__)

DEFAULT_FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts")
FONT_SUFFIXES = (".ttf", ".otf")
TEST_FONT_FRACTION = 0.25
_SCALE = 4  # draw at 4× the output size, then downsample: smooth edges even at 28 px
_CHECK_PX = 32
_MISSING = "\U0010fffd"  # a private-use code point: what a font draws for a glyph it lacks
# Symbol fonts mapping A-Z to other shapes (matplotlib's math extension font) pass the checks.
_NOT_TEXT = ("cmex",)


def find_fonts(
    letters: str = "ABCDEFGHIJ", font_dirs: Sequence[str | Path] | None = None
) -> list[Path]:
    """Font files drawing every letter distinctly, sorted; matplotlib's if the system has <2."""
    fonts = _usable_fonts(letters, font_dirs or DEFAULT_FONT_DIRS)
    if font_dirs is None and len(fonts) < 2:
        try:
            import matplotlib
        except ImportError:
            return fonts
        bundled = Path(matplotlib.__file__).parent / "mpl-data" / "fonts" / "ttf"
        log.warning("fewer than 2 system fonts; using matplotlib's bundled fonts in %s", bundled)
        fonts = _usable_fonts(letters, [bundled])
    return fonts


def _usable_fonts(letters: str, font_dirs: Sequence[str | Path]) -> list[Path]:
    found: set[Path] = set()
    for folder in map(Path, font_dirs):
        if folder.is_dir():
            found.update(
                p.resolve() for p in folder.rglob("*")
                if p.suffix.lower() in FONT_SUFFIXES and not p.name.startswith(_NOT_TEXT)
            )
    return sorted((p for p in found if _draws_letters(p, letters)), key=lambda p: (p.name, str(p)))


def _draws_letters(path: Path, letters: str) -> bool:
    """True when the font has a real, distinct glyph for each letter (not its missing-glyph box)."""
    try:
        font = ImageFont.truetype(str(path), _CHECK_PX)
        shapes = [_glyph(font, ch, 0).tobytes() for ch in letters + _MISSING]
    except (OSError, ValueError):
        return False
    drawn, missing = shapes[:-1], shapes[-1]
    return all(s and s != missing for s in drawn) and len(set(drawn)) == len(drawn)


def _glyph(font: ImageFont.FreeTypeFont, letter: str, stroke: int) -> Image.Image:
    """The letter drawn white on black, cropped to its ink (empty image when there is none)."""
    left, top, right, bottom = font.getbbox(letter, stroke_width=stroke)
    canvas = Image.new("L", (max(1, right - left), max(1, bottom - top)), 0)
    draw = ImageDraw.Draw(canvas)
    draw.text((-left, -top), letter, fill=255, font=font, stroke_width=stroke, stroke_fill=255)
    box = canvas.getbbox()
    return canvas.crop(box) if box else Image.new("L", (0, 0))


def split_fonts(fonts: Sequence[Path], seed: int) -> tuple[list[Path], list[Path]]:
    """Disjoint (train, test) font lists, the same for the same fonts and seed."""
    if len(fonts) < 2:
        raise DataError(f"found {len(fonts)} usable fonts, need at least 2")
    shuffled = sorted(fonts, key=lambda p: (p.name, str(p)))
    random.Random(seed).shuffle(shuffled)
    n_test = min(len(shuffled) - 1, max(1, round(len(shuffled) * TEST_FONT_FRACTION)))
    return sorted(shuffled[n_test:]), sorted(shuffled[:n_test])


def _read_manifest(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@lru_cache(maxsize=256)
def _font(path: str, px: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, px)


def _render(font_path: Path, letter: str, size: int, rng: random.Random) -> Image.Image:
    """One augmented sample: random stroke, scale, rotation, position, contrast and blur."""
    big = size * _SCALE
    stroke = rng.choice((0, 0, 1, 2, 3))
    glyph = _glyph(_font(str(font_path), big), letter, stroke)
    glyph = glyph.rotate(rng.uniform(-12, 12), resample=Image.BICUBIC, expand=True, fillcolor=0)
    # Fit the ink box (fonts differ a lot in cap height) to a random share of the canvas.
    target = big * rng.uniform(0.6, 0.9)
    ratio = target / max(glyph.size)
    width, height = max(1, round(glyph.width * ratio)), max(1, round(glyph.height * ratio))
    glyph = glyph.resize((width, height), Image.LANCZOS)
    canvas = Image.new("L", (big, big), 0)
    x = round((big - glyph.width) * rng.uniform(0.1, 0.9))
    y = round((big - glyph.height) * rng.uniform(0.1, 0.9))
    canvas.paste(glyph, (x, y))
    image = canvas.resize((size, size), Image.LANCZOS)
    low, high = rng.randint(0, 60), rng.randint(170, 255)
    image = image.point(lambda v: low + (high - low) * v // 255)
    if rng.random() < 0.3:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.8)))
    return image


def render_letters(
    out_dir: str | Path,
    *,
    letters: str = "ABCDEFGHIJ",
    size: int = 28,
    train_per_class: int = 500,
    test_per_class: int = 100,
    seed: int = 0,
    font_dirs: Sequence[str | Path] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write out_dir/{train,test}/<letter>/NNNNN.png; train and test use disjoint fonts.

    Reproducible: the same seed and fonts give byte-identical files. A folder already rendered with
    the same settings is reused, an earlier rendering by this function is replaced, and train/test
    folders of unknown origin are replaced only when overwrite=True.
    """
    if not letters or len(set(letters)) != len(letters) or not all(ch.isalnum() for ch in letters):
        raise DataError(f"letters must be distinct letters or digits, got '{letters}'")
    if size < 8 or train_per_class < 1 or test_per_class < 1:
        raise DataError("size must be ≥ 8 and train/test images per class ≥ 1")
    out = Path(out_dir).expanduser().resolve()
    fonts = find_fonts(letters, font_dirs)
    if len(fonts) < 2:
        searched = ", ".join(map(str, font_dirs or DEFAULT_FONT_DIRS))
        raise DataError(
            f"found {len(fonts)} usable fonts in {searched}, need at least 2 "
            "(install fonts-dejavu-core, fonts-liberation or fonts-freefont-ttf)"
        )
    train_fonts, test_fonts = split_fonts(fonts, seed)
    manifest = {
        "letters": letters, "size": size, "seed": seed,
        "per_class": {"train": train_per_class, "test": test_per_class},
        "fonts": {"train": [p.name for p in train_fonts], "test": [p.name for p in test_fonts]},
    }
    manifest_path = out / "letters.json"
    previous = _read_manifest(manifest_path)
    if previous == {**manifest, "complete": True}:
        log.info("letters already rendered in %s", out)
        return out
    existing = [out / s for s in ("train", "test") if (out / s).exists()]
    if existing and previous is None and not overwrite:
        raise DataError(f"'{out}' already holds train/test folders; pass overwrite=True to replace")
    if existing:
        log.warning("replacing train/ and test/ in %s", out)
    for folder in existing:
        shutil.rmtree(folder)
    # Claim the folder first: an interrupted render is then known to be ours, and never "complete".
    out.mkdir(parents=True, exist_ok=True)
    manifest_path.write_text(json.dumps({**manifest, "complete": False}, indent=1) + "\n")

    jobs = (("train", train_fonts, train_per_class), ("test", test_fonts, test_per_class))
    for split, fonts_, count in jobs:
        for k, letter in enumerate(letters):
            folder = out / split / letter
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                # One generator per image: files do not depend on how many others are rendered.
                rng = random.Random(f"{seed}:{split}:{letter}:{i}")
                font = fonts_[(i + k) % len(fonts_)]
                _render(font, letter, size, rng).save(folder / f"{i:05d}.png", format="PNG")
    manifest_path.write_text(json.dumps({**manifest, "complete": True}, indent=1) + "\n")
    log.info(
        "rendered %d letters × (%d train, %d test) at %d px from %d + %d fonts into %s",
        len(letters), train_per_class, test_per_class, size, len(train_fonts), len(test_fonts), out,
    )
    return out
