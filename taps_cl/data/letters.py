"""Render a notMNIST-style letters dataset (an imagefolder) from TrueType fonts.

By default the fonts are a pinned list of files from three named Debian packages
(`PINNED_FONTS`), so the data set is the same on every machine whatever else is installed; a
machine that lacks one of them is refused rather than given other fonts. `font_dirs` renders from
the fonts found in folders the caller names instead.
"""

from __future__ import annotations

import hashlib
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

# The default fonts, by the Debian package that installs them (`dpkg -L PACKAGE` on Debian 12:
# fonts-dejavu-core 2.37-6, fonts-liberation 1:1.07.4-11, fonts-freefont-ttf 20120503-10; the
# README's first command and .ci/run install them). Every file draws A–Z, a–z and 0–9 distinctly
# (the check `_draws_letters` makes). Pinned because rendering from whatever fonts a machine has
# made the data differ between machines: installing two more font packages moved the benchmark's
# letters row of the linear probe from 83.4 % to 81.9 %. Other fonts are ignored.
PINNED_FONTS: dict[str, tuple[str, ...]] = {
    "fonts-dejavu-core": tuple(
        f"/usr/share/fonts/truetype/dejavu/{name}.ttf" for name in (
            "DejaVuSans-Bold", "DejaVuSans", "DejaVuSansMono-Bold", "DejaVuSansMono",
            "DejaVuSerif-Bold", "DejaVuSerif",
        )
    ),
    "fonts-liberation": tuple(
        f"/usr/share/fonts/truetype/liberation/Liberation{family}-{style}.ttf"
        for family in ("Mono", "Sans", "SansNarrow", "Serif")
        for style in ("Bold", "BoldItalic", "Italic", "Regular")
    ),
    "fonts-freefont-ttf": tuple(
        f"/usr/share/fonts/truetype/freefont/{name}.ttf" for name in (
            "FreeMono", "FreeMonoBold", "FreeMonoBoldOblique", "FreeMonoOblique",
            "FreeSans", "FreeSansBold", "FreeSansBoldOblique", "FreeSansOblique",
            "FreeSerif", "FreeSerifBold", "FreeSerifBoldItalic", "FreeSerifItalic",
        )
    ),
}
# Searched by `find_fonts` when it is given no folders (not used for the pinned default).
DEFAULT_FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts")
FONT_SUFFIXES = (".ttf", ".otf")
TEST_FONT_FRACTION = 0.25
_SCALE = 4  # draw at 4× the output size, then downsample: smooth edges even at 28 px
_CHECK_PX = 32
_MISSING = "\U0010fffd"  # a private-use code point: what a font draws for a glyph it lacks
# Symbol fonts mapping A-Z to other shapes (matplotlib's math extension font) pass the checks.
_NOT_TEXT = ("cmex",)


def pinned_fonts(letters: str = "ABCDEFGHIJ") -> list[Path]:
    """The files of `PINNED_FONTS`, sorted; refuses when one is missing or cannot draw `letters`.

    Exactly the listed files, whatever other fonts the machine has: the default data set then
    does not depend on what else is installed.
    """
    listed = [(package, Path(f)) for package, files in PINNED_FONTS.items() for f in files]
    missing = [(package, path) for package, path in listed if not path.is_file()]
    if missing:
        packages = " ".join(dict.fromkeys(package for package, _ in missing))
        raise DataError(
            f"{len(missing)} of the {len(listed)} pinned letter fonts are missing: "
            f"{', '.join(str(p) for _, p in missing)} (install them: sudo apt-get install "
            f"{packages}; or render from other fonts with font_dirs / --font-dir)"
        )
    unusable = [path for _, path in listed if not _draws_letters(path, letters)]
    if unusable:
        raise DataError(
            f"pinned fonts do not draw '{letters}' distinctly: "
            f"{', '.join(map(str, unusable))} (render from other fonts with font_dirs / --font-dir)"
        )
    return sorted((path for _, path in listed), key=lambda p: (p.name, str(p)))


def find_fonts(
    letters: str = "ABCDEFGHIJ", font_dirs: Sequence[str | Path] | None = None
) -> list[Path]:
    """Font files in `font_dirs` (default `DEFAULT_FONT_DIRS`) drawing every letter distinctly."""
    return _usable_fonts(letters, font_dirs or DEFAULT_FONT_DIRS)


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


def font_set(fonts: Sequence[Path]) -> dict[str, str]:
    """File name → sha256 of each font: what the manifest records and a re-render compares."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(fonts, key=lambda p: (p.name, str(p)))}


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

    Fonts: exactly the pinned files (`PINNED_FONTS`; refused with the install command when one is
    missing), or with `font_dirs` the usable fonts found there. `out_dir/letters.json` records the
    settings and each font file's name and sha256. Reproducible: the same seed and fonts give
    byte-identical files. A folder already rendered with the same settings is reused; an earlier
    rendering by this function with other settings is replaced, but one from a different font set
    is refused (its data would silently change) unless overwrite=True, and so are train/test
    folders of unknown origin.
    """
    if not letters or len(set(letters)) != len(letters) or not all(ch.isalnum() for ch in letters):
        raise DataError(f"letters must be distinct letters or digits, got '{letters}'")
    if size < 8 or train_per_class < 1 or test_per_class < 1:
        raise DataError("size must be ≥ 8 and train/test images per class ≥ 1")
    out = Path(out_dir).expanduser().resolve()
    if font_dirs is None:
        fonts, source = pinned_fonts(letters), "pinned"
    else:
        fonts, source = find_fonts(letters, font_dirs), "font_dirs"
        if len(fonts) < 2:
            raise DataError(
                f"found {len(fonts)} usable fonts in {', '.join(map(str, font_dirs))}, "
                "need at least 2"
            )
    train_fonts, test_fonts = split_fonts(fonts, seed)
    files = font_set(fonts)
    manifest = {
        "letters": letters, "size": size, "seed": seed,
        "per_class": {"train": train_per_class, "test": test_per_class},
        "fonts": {"train": [p.name for p in train_fonts], "test": [p.name for p in test_fonts]},
        "font_source": source,
        "font_files": files,
    }
    manifest_path = out / "letters.json"
    previous = _read_manifest(manifest_path)
    if previous == {**manifest, "complete": True}:
        log.info("letters already rendered in %s", out)
        return out
    existing = [out / s for s in ("train", "test") if (out / s).exists()]
    if existing and previous is None and not overwrite:
        raise DataError(f"'{out}' already holds train/test folders; pass overwrite=True to replace")
    if existing and previous is not None and previous.get("font_files") != files and not overwrite:
        before = previous.get("font_files") or {}
        changed = sorted(set(before) ^ set(files)) or sorted(
            name for name in files if before.get(name) != files[name])
        raise DataError(
            f"'{out}' was rendered from a different font set ({len(before)} fonts recorded, "
            f"{len(files)} now; differing: {', '.join(changed[:5])}"
            f"{' …' if len(changed) > 5 else ''}); render into a new folder or pass "
            "overwrite=True to replace it"
        )
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
