"""Rendered letters dataset: reproducible, disjoint train/test fonts, loadable as an imagefolder."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from taps_cl.data import letters as letters_module
from taps_cl.data.letters import PINNED_FONTS, pinned_fonts, render_letters, split_fonts
from taps_cl.data.specs import load_task_data
from taps_cl.errors import DataError

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "make_letters.py"
SMALL = {"letters": "ABC", "size": 16, "train_per_class": 4, "test_per_class": 2}


@pytest.fixture(scope="module")
def fonts() -> list[Path]:
    try:
        return pinned_fonts(SMALL["letters"])
    except DataError as exc:  # .ci/run and the README's first command install them
        pytest.skip(f"pinned font packages not installed: {exc}")


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def test_same_seed_gives_byte_identical_files(tmp_path, fonts):
    a = render_letters(tmp_path / "a", seed=3, **SMALL)
    b = render_letters(tmp_path / "b", seed=3, **SMALL)
    c = render_letters(tmp_path / "c", seed=4, **SMALL)
    assert len(files(a)) == 3 * (4 + 2)
    assert files(a) == files(b)
    assert files(a) != files(c)
    assert sorted(p.name for p in (a / "train").iterdir()) == ["A", "B", "C"]


def test_train_and_test_fonts_are_disjoint(tmp_path, fonts):
    train, test = split_fonts(fonts, seed=0)
    assert train and test and not set(train) & set(test)
    assert sorted(train + test) == sorted(fonts)
    assert split_fonts(list(reversed(fonts)), seed=0) == (train, test)
    out = render_letters(tmp_path / "l", **SMALL)
    manifest = json.loads((out / "letters.json").read_text())
    assert not set(manifest["fonts"]["train"]) & set(manifest["fonts"]["test"])


def test_rendered_letters_load_as_imagefolder(tmp_path, fonts):
    out = render_letters(tmp_path / "l", **SMALL)
    cfg = {"input_size": [3, 8, 8], "mean": [0.5] * 3, "std": [0.5] * 3}
    data = load_task_data(f"imagefolder:{out}", cfg, val_fraction=0.25)
    assert data.class_names == ["A", "B", "C"]
    assert (len(data.train), len(data.val), len(data.test)) == (9, 3, 6)
    assert data.test[0][0].shape == (3, 8, 8)


def test_rerender_is_reused_replaced_or_refused(tmp_path, fonts):
    out = render_letters(tmp_path / "l", **SMALL)
    stamp = (out / "train" / "A" / "00000.png").stat().st_mtime_ns
    assert render_letters(out, **SMALL) == out
    assert (out / "train" / "A" / "00000.png").stat().st_mtime_ns == stamp
    # Its own earlier rendering is replaced; folders of unknown origin only on request.
    render_letters(out, **{**SMALL, "train_per_class": 2})
    assert len(list((out / "train" / "A").iterdir())) == 2
    (out / "letters.json").unlink()
    with pytest.raises(DataError, match="overwrite"):
        render_letters(out, **SMALL)
    render_letters(out, overwrite=True, **SMALL)
    assert len(list((out / "train" / "A").iterdir())) == 4


def test_default_fonts_are_exactly_the_pinned_files(tmp_path, fonts, monkeypatch):
    listed = {Path(f).name for files in PINNED_FONTS.values() for f in files}
    assert {p.name for p in fonts} == listed and len(fonts) == len(listed)
    # A font in the searched folders that is not pinned changes nothing.
    extra = tmp_path / "extra"
    extra.mkdir()
    shutil.copy(fonts[0], extra / "NotPinned.ttf")
    monkeypatch.setattr(letters_module, "DEFAULT_FONT_DIRS",
                        (str(extra), *letters_module.DEFAULT_FONT_DIRS))
    out = render_letters(tmp_path / "l", **SMALL)
    manifest = json.loads((out / "letters.json").read_text())
    assert manifest["font_source"] == "pinned"
    assert set(manifest["font_files"]) == listed
    assert all(len(digest) == 64 for digest in manifest["font_files"].values())
    assert set(manifest["fonts"]["train"]) | set(manifest["fonts"]["test"]) == listed


def test_missing_pinned_font_is_refused(tmp_path, monkeypatch):
    gone = tmp_path / "gone" / "DejaVuGone.ttf"
    pinned = {"fonts-dejavu-core": (str(gone),),
              "fonts-liberation": tuple(PINNED_FONTS["fonts-liberation"])}
    monkeypatch.setattr(letters_module, "PINNED_FONTS", pinned)
    with pytest.raises(DataError) as caught:
        render_letters(tmp_path / "out", **SMALL)
    message = str(caught.value)
    assert "\n" not in message and str(gone) in message
    assert "apt-get install fonts-dejavu-core" in message
    assert not (tmp_path / "out").exists()


def test_rerender_from_another_font_set_is_refused(tmp_path, fonts):
    two = tmp_path / "two"
    two.mkdir()
    for font in fonts[:2]:
        shutil.copy(font, two)
    out = render_letters(tmp_path / "l", font_dirs=[two], **SMALL)
    manifest = json.loads((out / "letters.json").read_text())
    assert manifest["font_source"] == "font_dirs"
    assert sorted(manifest["font_files"]) == sorted(f.name for f in fonts[:2])
    before = files(out)
    with pytest.raises(DataError, match="different font set"):
        render_letters(out, **SMALL)
    assert files(out) == before
    render_letters(out, overwrite=True, **SMALL)
    manifest = json.loads((out / "letters.json").read_text())
    assert len(manifest["font_files"]) == len(fonts)


def test_no_fonts(tmp_path):
    with pytest.raises(DataError, match="found 0 usable fonts"):
        render_letters(tmp_path / "out", font_dirs=[tmp_path / "empty"], **SMALL)


def test_one_font_is_not_enough(tmp_path, fonts):
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(fonts[0], one)
    (one / "junk.ttf").write_bytes(b"not a font")
    with pytest.raises(DataError, match="found 1 usable fonts"):
        render_letters(tmp_path / "out", font_dirs=[one], **SMALL)


@pytest.mark.parametrize("bad", [{"letters": "AA"}, {"letters": ""}, {"letters": "A/"}, {"size": 4},
                                 {"train_per_class": 0}])
def test_bad_arguments(tmp_path, bad):
    with pytest.raises(DataError):
        render_letters(tmp_path / "out", **{**SMALL, **bad})


def test_example_script(tmp_path, fonts, capsys):
    spec = importlib.util.spec_from_file_location("make_letters", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = [str(tmp_path / "l"), "--letters", "AB", "--size", "12", "--train-per-class", "3",
            "--test-per-class", "1"]
    assert module.main(args) == 0
    assert "wrote 6 train and 2 test images" in capsys.readouterr().out
    assert module.main([str(tmp_path / "x"), "--font-dir", str(tmp_path / "none")]) == 1
    assert capsys.readouterr().err.startswith("Error: ")
