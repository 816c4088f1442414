"""Screenshots of the web overview (`taps-cl ui`): the registry, base and task pages.

    python examples/ui_screenshots.py --out docs/screenshots            # a small sample registry
    python examples/ui_screenshots.py --home ~/.taps-cl --task fashion  # your own registry

Without `--home` it builds a sample registry in a temporary directory: a seeded
`timm:test_efficientnet` base with seven tasks on scikit-learn's digits (class subsets, 32 px,
one epoch: a minute on two cores) that cover the methods whose lineage the pages draw — TAPS,
linear probe, adapter, AdapterFusion reading the adapter, and three progressive tasks in two
groups — plus a second base without tasks. It then starts `python -m taps_cl ui` as its own
process, drives Debian's chromium through chromium-driver (Selenium, headless) and saves
registry.png, base.png and task.png under `--out`. tests/test_ui_browser.py uses the same
functions on the same sample.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

# Every sample task: (name, data spec, method, method options, run options).
SAMPLE_TASKS: tuple[tuple[str, str, str, dict[str, Any], dict[str, Any]], ...] = (
    ("low-digits", "digits", "taps", {}, {"classes": "0,1,2,3,4"}),
    ("high-digits", "digits", "linear", {}, {"classes": "5,6,7,8,9"}),
    ("even", "digits", "adapter", {}, {"classes": "0,2,4,6,8"}),
    ("odd-fused", "digits", "fusion", {"fuse": "even"}, {"classes": "1,3,5,7,9"}),
    ("p-012", "digits", "progressive", {"group": "new"}, {"classes": "0,1,2"}),
    ("p-345", "digits", "progressive", {"group": "p-012"}, {"classes": "3,4,5"}),
    ("p-678", "digits", "progressive", {"group": "new"}, {"classes": "6,7,8"}),
)
# Small and quick: one epoch on 200 training images at 32 px. Each add re-checks one earlier
# task (and any it reads), so the accuracy matrix has derived cells as a long sequence does.
SAMPLE_TRAINING = {"epochs": 1, "batch_size": 32, "img_size": 32, "max_train": 200,
                   "max_test": 100, "seed": 0, "lr": 1e-2, "device": "cpu", "recheck": 1}
PROGRESSIVE_BANDS = {"shared_fraction": 0.4, "task_fraction": 0.2}


def build_sample_registry(home: Path) -> Path:
    """Write the sample registry into `home` (a new directory) and return it."""
    import torch

    from taps_cl import Manager

    torch.manual_seed(0)  # the base's random weights, the same in every sample
    with Manager(home) as m:
        m.add_base("demo", "timm:test_efficientnet")
        m.add_base("spare", "timm:test_resnet")
        for name, spec, method, options, run in SAMPLE_TASKS:
            if method == "progressive":
                options = {**PROGRESSIVE_BANDS, **options}
            m.add_task(name, "demo", spec, method=method, method_options=options,
                       **run, **SAMPLE_TRAINING)
    return home


def write_digit_png(path: Path, index: int = 0) -> Path:
    """One of scikit-learn's digits (8×8, shown 32×32) as a PNG file, to upload on try-it."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    pixels = np.round(load_digits().images[index] * (255 / 16)).astype(np.uint8)
    Image.fromarray(pixels).resize((32, 32), Image.NEAREST).convert("RGB").save(path)
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def running_ui(home: Path, port: Optional[int] = None,
               timeout: float = 60.0) -> Iterator[str]:
    """`python -m taps_cl --home HOME ui --port PORT` as a process: yields its URL, then stops."""
    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    log = tempfile.TemporaryFile()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.Popen([sys.executable, "-m", "taps_cl", "--home", str(home), "ui",
                             "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"taps-cl ui exited with {proc.returncode}: "
                                   f"{log.read().decode(errors='replace')}")
            try:
                with urllib.request.urlopen(url + "/", timeout=5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"taps-cl ui did not answer on {url} in {timeout:.0f} s") from None
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def chromium(width: int = 1280, height: int = 1000) -> Any:
    """A headless Debian chromium driven through chromium-driver (Selenium)."""
    from selenium import webdriver

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}"):
        options.add_argument(arg)
    return webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER),
                            options=options)


def full_page(driver: Any, path: Path) -> Path:
    """Save the whole page (the window stretched to the document's height) as a PNG."""
    # The body's height is the content's (the document's is at least the window's).
    width = driver.execute_script("return document.body.scrollWidth")
    height = driver.execute_script("return document.body.scrollHeight")
    driver.set_window_size(max(1280, int(width)), min(max(800, int(height) + 140), 6000))
    path.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(path))
    return path


def take_screenshots(driver: Any, url: str, out: Path, base: str, task: str) -> list[Path]:
    """registry.png, base.png and task.png of the app at `url`, under `out`."""
    shots = []
    for name, page in (("registry", "/"), ("base", f"/bases/{base}"), ("task", f"/tasks/{task}")):
        driver.set_window_size(1280, 800)
        driver.get(url + page)
        shots.append(full_page(driver, out / f"{name}.png"))
    return shots


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, help="A registry (default: build the sample).")
    parser.add_argument("--base", default="demo", help="The base page to show.")
    parser.add_argument("--task", default="odd-fused", help="The task page to show.")
    parser.add_argument("--out", type=Path, default=Path("docs/screenshots"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        home = args.home or build_sample_registry(Path(scratch) / "home")
        with running_ui(home) as url:
            driver = chromium()
            try:
                for path in take_screenshots(driver, url, args.out, args.base, args.task):
                    print(path)
            finally:
                driver.quit()


if __name__ == "__main__":
    main()
