"""Render a notMNIST-style letters dataset, usable as imagefolder:OUT_DIR.

By default from the pinned font files of fonts-dejavu-core, fonts-liberation and
fonts-freefont-ttf (taps_cl.data.letters.PINNED_FONTS; refused when one is missing), so the data is the
same on every machine; --font-dir renders from the fonts in folders you name instead. The fonts
used (names and sha256) are recorded in OUT_DIR/letters.json.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from taps_cl.errors import TapsError
from taps_cl.data.letters import render_letters


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, render, and say where the images went."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out_dir", type=Path, help="folder to write train/ and test/ into")
    parser.add_argument("--letters", default="ABCDEFGHIJ", help="classes, one character each")
    parser.add_argument("--size", type=int, default=28, help="image side in pixels")
    parser.add_argument("--train-per-class", type=int, default=500)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0, help="same seed, same fonts → same files")
    parser.add_argument(
        "--font-dir", action="append", dest="font_dirs", help="render from the usable fonts "
        "in this folder instead of the pinned Debian font files (repeatable)"
    )
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a rendering from another font set or of unknown origin")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        out = render_letters(
            args.out_dir, letters=args.letters, size=args.size,
            train_per_class=args.train_per_class, test_per_class=args.test_per_class,
            seed=args.seed, font_dirs=args.font_dirs, overwrite=args.overwrite,
        )
    except TapsError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    counts = {split: sum(1 for _ in (out / split).rglob("*.png")) for split in ("train", "test")}
    print(f"wrote {counts['train']} train and {counts['test']} test images to {out}")
    print(f"use it as: --data imagefolder:{out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
