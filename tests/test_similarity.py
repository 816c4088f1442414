"""Gradient task similarity: signatures, cosine matrix, clustering, report."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sqlalchemy import text

from taps_cl import serialization
from taps_cl.analysis import plots, similarity
from taps_cl.data import specs as data
from taps_cl.errors import MethodError, TapsError
from taps_cl.manager import Manager
from taps_cl.models import backbones
from taps_cl.models.backbones import example_input
from tests.conftest import make_imagefolder
from tests.test_cli import assert_one_line_error, run

SPEC = backbones.ModelSpec.parse("timm:test_resnet")
SIZE = 32


@pytest.fixture(scope="module")
def base():
    """(state, data config, head keys) of a seeded test_resnet."""
    torch.manual_seed(0)
    net = backbones.create_model(SPEC)
    return net.state_dict(), backbones.data_config(net, SPEC), backbones.head_keys(SPEC)


def signature_of(base, folder: Path, config=None, rng_seed: int = 0):
    """The signature of an imagefolder's training split on a fresh task model (and the model)."""
    state, config_dc, head = base
    task = data.load_task_data(f"imagefolder:{folder}", config_dc, img_size=SIZE)
    torch.manual_seed(rng_seed)  # the fresh head's init: the signature must not depend on it
    model = backbones.build_task_model(SPEC, state, len(task.class_names), head)
    sig = similarity.task_signature(model, head, task.train, example=example_input(config_dc, SIZE),
                                    config=config or similarity.SignatureConfig())
    return sig, model


# -------------------------------------------------------------------------------- signature


def test_config_is_validated():
    assert similarity.SignatureConfig().batches == 16
    for bad in ({"batches": 0}, {"batch_size": 1.5}, {"head_steps": True}, {"seed": -1},
                {"head_l2": float("nan")}, {"reduction": 0}, {"head_samples": "8"}):
        with pytest.raises(MethodError, match="signature: "):
            similarity.SignatureConfig(**bad)


def test_signature_is_deterministic_unit_and_data_dependent(base, tmp_path):
    folder = make_imagefolder(tmp_path / "a", seed=1)
    other = make_imagefolder(tmp_path / "b", ("checker", "blob"), seed=2)
    first, model = signature_of(base, folder, rng_seed=1)
    again, model2 = signature_of(base, folder, rng_seed=2)  # another global RNG state
    assert first.dtype == torch.float32 and first.dim() == 1 and first.device.type == "cpu"
    assert torch.equal(first, again)  # bit for bit
    assert float(torch.linalg.vector_norm(first.double())) == pytest.approx(1.0, abs=1e-6)
    meta = similarity.signature_meta(model)
    assert meta == similarity.signature_meta(model2)
    assert (similarity.signature_to_bytes(first, meta)
            == similarity.signature_to_bytes(again, meta))

    # test_resnet has 4 blocks: the middle third is layer2.0 (48 channels, width 48 // 16 = 3);
    # the signature is its up projection's weight (48×3) and bias (48).
    assert meta["blocks"] == ["layer2.0"] and meta["recipe"] == similarity.RECIPE
    assert first.numel() == 48 * 3 + 48
    # The adapters' down projections come from the seed, not from torch's global RNG.
    adapters, adapters2 = (getattr(m, similarity.SIGNATURE_ATTR) for m in (model, model2))
    assert torch.equal(adapters["layer2-0"].down.weight, adapters2["layer2-0"].down.weight)
    assert torch.count_nonzero(adapters["layer2-0"].up.weight) == 0  # still zero: never updated

    different, _ = signature_of(base, other)
    assert not torch.equal(first, different)
    assert similarity.cosine_matrix([first, different])[0, 1] < 0.999
    reseeded, _ = signature_of(base, folder, similarity.SignatureConfig(seed=1))
    assert not torch.equal(first, reseeded)


def test_signature_refuses_an_empty_training_set(base):
    state, dc, head = base
    model = backbones.build_task_model(SPEC, state, 2, head)
    with pytest.raises(TapsError, match="empty"):
        similarity.task_signature(model, head, [], example=example_input(dc, SIZE))


def test_bytes_round_trip_and_recipe_mismatch_is_refused():
    sig = torch.nn.functional.normalize(torch.randn(20), dim=0)
    meta = {"recipe": similarity.RECIPE, "config": {"seed": 0, "batches": 4},
            "blocks": ["layer2.0"], "task": "t"}
    blob = similarity.signature_to_bytes(sig, meta)
    assert torch.equal(similarity.signature_from_bytes(blob), sig)
    stored = serialization.metadata_from_bytes(blob)
    assert stored["kind"] == "signature" and stored["task"] == "t"
    assert similarity.signature_recipe(blob) == {k: meta[k] for k in ("recipe", "config", "blocks")}

    old = similarity.signature_to_bytes(sig, {**meta, "recipe": "taps-cl/gradient-signature/0"})
    with pytest.raises(TapsError, match="recipe 'taps-cl/gradient-signature/0'"):
        similarity.signature_from_bytes(old)
    with pytest.raises(TapsError, match="1-D"):
        similarity.signature_to_bytes(sig.reshape(4, 5), meta)

    seeded = similarity.signature_recipe(
        similarity.signature_to_bytes(sig, {**meta, "config": {"seed": 1, "batches": 4}}))
    with pytest.raises(TapsError) as info:
        similarity.check_comparable([similarity.signature_recipe(blob), seeded], ["a", "b"])
    assert "'a' and 'b'" in str(info.value) and "configs" in str(info.value)
    assert "\n" not in str(info.value)
    moved = similarity.signature_recipe(
        similarity.signature_to_bytes(sig, {**meta, "blocks": ["layer3.0"]}))
    with pytest.raises(TapsError, match="different blocks"):
        similarity.check_comparable([similarity.signature_recipe(blob), moved], ["a", "b"])
    similarity.check_comparable([similarity.signature_recipe(blob)] * 3, ["a", "b", "c"])


# --------------------------------------------------------------------- matrix and clustering


def test_cosine_matrix_properties():
    gen = torch.Generator().manual_seed(0)
    sigs = [torch.randn(50, generator=gen) for _ in range(4)]
    sigs.append(-2.5 * sigs[0])  # opposite direction, other length
    m = similarity.cosine_matrix(sigs)
    assert m.dtype == np.float64 and m.shape == (5, 5)
    assert np.array_equal(m, m.T) and np.all(np.diag(m) == 1.0)
    assert np.all(np.abs(m) <= 1.0)
    a, b = sigs[1].double(), sigs[2].double()
    assert m[1, 2] == pytest.approx(float(a @ b / (a.norm() * b.norm())), abs=1e-12)
    assert m[0, 4] == pytest.approx(-1.0, abs=1e-12)
    assert similarity.cosine_matrix([]).shape == (0, 0)
    with pytest.raises(TapsError, match="different sizes"):
        similarity.cosine_matrix([torch.ones(3), torch.ones(4)])
    with pytest.raises(TapsError, match="zero"):
        similarity.cosine_matrix([torch.ones(3), torch.zeros(3)])


def blocks_matrix() -> np.ndarray:
    """Two obvious groups, {0, 2, 4} and {1, 3}, interleaved so that renumbering shows."""
    m = np.full((5, 5), 0.05)
    for group in ((0, 2, 4), (1, 3)):
        for i in group:
            for j in group:
                m[i, j] = 0.9
    np.fill_diagonal(m, 1.0)
    return m


def test_cluster_automatic_and_with_k():
    m = blocks_matrix()
    assert similarity.cluster(m) == [0, 1, 0, 1, 0]
    assert similarity.cluster(m, k=2) == [0, 1, 0, 1, 0]
    assert similarity.cluster(m, k=1) == [0] * 5
    assert similarity.cluster(m, k=5) == [0, 1, 2, 3, 4]
    three = similarity.cluster(m, k=3)
    assert three[0] == 0 and len(set(three)) == 3
    assert similarity.cluster(np.eye(3)) == [0, 1, 2]  # nothing alike: every task its own group
    assert similarity.cluster(np.ones((3, 3))) == [0, 0, 0]
    # The threshold decides: 0.9-similar tasks stay apart when asked to merge only above 0.95.
    assert similarity.cluster(m, threshold=0.05) == [0, 1, 2, 3, 4]
    assert similarity.cluster(np.ones((1, 1))) == [0] and similarity.cluster(np.zeros((0, 0))) == []


@pytest.mark.parametrize("k", [0, 6, -1, 2.0, True])
def test_cluster_refuses_a_bad_k(k):
    with pytest.raises(TapsError, match=r"between 1 and 5") as info:
        similarity.cluster(blocks_matrix(), k=k)
    assert "\n" not in str(info.value)


def test_cluster_refuses_a_bad_matrix_or_threshold():
    with pytest.raises(TapsError, match="square"):
        similarity.cluster(np.ones((2, 3)))
    with pytest.raises(TapsError, match="square"):
        similarity.cluster(np.full((2, 2), np.nan))
    with pytest.raises(TapsError, match="threshold"):
        similarity.cluster(np.eye(2), threshold=0)


# ------------------------------------------------------------------- registry and report

N_TRAIN = 48  # per class: enough images that a task's signature is stable across its samples


def _image(kind: str, rng: np.random.Generator) -> np.ndarray:
    """Grey stripes of random period/phase ("h", "v") or a flat colour ("red", "blue"), noisy."""
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    period = int(rng.integers(4, 9))
    phase = int(rng.integers(0, period))
    if kind in ("h", "v"):
        mask = (((y if kind == "h" else x) + phase) // (period // 2)) % 2
        rgb = mask[..., None] * np.array([200, 200, 200]) + 30
    else:
        rgb = np.ones((SIZE, SIZE, 1)) * np.array([200, 40, 40] if kind == "red" else [40, 40, 200])
    return np.clip(rgb + rng.normal(0, 20, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)


def pattern_folder(root: Path, classes: tuple[str, ...], seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for split, n in (("train", N_TRAIN), ("test", 4)):
        for cls in classes:
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(_image(cls, rng)).save(folder / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def sim_home(tmp_path_factory):
    """A registry with three linear tasks: two orientation tasks on separately drawn images
    (related) and a colour task (unrelated); data in ../orient1, ../orient2, ../colour."""
    root = tmp_path_factory.mktemp("similarity")
    specs = {"orient1": pattern_folder(root / "orient1", ("h", "v"), 1),
             "orient2": pattern_folder(root / "orient2", ("h", "v"), 2),
             "colour": pattern_folder(root / "colour", ("red", "blue"), 3)}
    home = root / "home"
    torch.manual_seed(0)  # the base's random init
    with Manager(home) as m:
        m.add_base("b", "timm:test_resnet")
        for name, folder in specs.items():
            m.add_task(name, "b", f"imagefolder:{folder}", method="linear", epochs=1,
                       batch_size=32, img_size=SIZE, recheck=0)
    return home


def test_related_tasks_are_more_similar(sim_home):
    with Manager(sim_home) as m:
        assert all(t.signature is not None and t.signature.kind == "signature"
                   for t in m.list_tasks())
        rep = m.similarity()
    assert rep.tasks == ("orient1", "orient2", "colour") and rep.without_signature == ()
    s = np.array(rep.matrix)
    assert np.array_equal(s, s.T) and np.all(np.diag(s) == 1.0)
    # The two orientation tasks agree far more with each other than either with colours.
    assert s[0, 1] > s[0, 2] + 0.2 and s[0, 1] > s[1, 2] + 0.2
    assert similarity.cluster(s, k=2) == [0, 0, 1]
    assert rep.groups == (0, 0, 1)  # the automatic threshold finds the same groups
    assert rep.candidate is None and "candidate" not in rep.to_json()


def test_candidate_of_a_task_s_own_data_matches_its_stored_signature(sim_home):
    """The candidate path computes what `task add` stored: the same data gives cosine 1."""
    folder = sim_home.parent / "orient2"
    with Manager(sim_home) as m:
        rep = m.similarity(data=f"imagefolder:{folder}", img_size=SIZE)
        # The same classes in another order: the signature does not depend on label order.
        reordered = m.similarity("b", f"imagefolder:{sim_home.parent / 'colour'}",
                                 classes="blue,red", img_size=SIZE)
        with pytest.raises(TapsError, match="one class"):
            m.similarity(data=f"imagefolder:{sim_home.parent / 'colour'}", classes="red",
                         img_size=SIZE)
    assert rep.candidate == f"imagefolder:{folder}"
    assert rep.candidate_row[1] == pytest.approx(1.0, abs=1e-6)
    assert rep.closest == "orient2"
    assert rep.candidate_row[0] > rep.candidate_row[2]
    assert reordered.candidate.endswith("(classes blue,red)")
    assert reordered.candidate_row[2] == pytest.approx(1.0, abs=1e-4)
    assert reordered.closest == "colour"
    doc = rep.to_json()
    assert doc["candidate"] == {"name": rep.candidate, "row": list(rep.candidate_row),
                                "closest": "orient2"}
    assert m.registry is not None  # the manager stayed usable; nothing was recorded:
    with Manager(sim_home) as m2:
        assert [t.name for t in m2.list_tasks()] == ["orient1", "orient2", "colour"]


def test_tasks_without_a_signature_are_left_out(sim_home, tmp_path):
    home = tmp_path / "home"
    shutil.copytree(sim_home, home)
    with Manager(home) as m:
        with m.registry.engine.begin() as conn:
            conn.execute(text("UPDATE tasks SET signature_artifact_id = NULL "
                              "WHERE name = 'orient1'"))
        rep = m.similarity()
    assert rep.tasks == ("orient2", "colour") and len(rep.matrix) == 2
    ((name, reason),) = rep.without_signature
    assert name == "orient1" and "no signature" in reason
    assert rep.to_json()["without_signature"] == [{"name": "orient1", "reason": reason}]


def test_report_similarity_cli(sim_home, capsys, tmp_path):
    home = str(sim_home)
    code, out, err = run(capsys, "--home", home, "--json", "report", "similarity")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["tasks"] == ["orient1", "orient2", "colour"] and doc["groups"] == [0, 0, 1]
    assert len(doc["matrix"]) == 3 and all(len(row) == 3 for row in doc["matrix"])
    assert doc["matrix"][0][0] == 1.0 and "candidate" not in doc

    png = tmp_path / "plots" / "similarity.png"
    colour = sim_home.parent / "colour"
    code, out, err = run(capsys, "--home", home, "--json", "report", "similarity", "--base", "b",
                         "--data", f"imagefolder:{colour}", "--img-size", str(SIZE),
                         "--plot", str(png))
    assert code == 0, err
    doc = json.loads(out)
    assert doc["candidate"]["closest"] == "colour"
    assert doc["candidate"]["row"][2] == pytest.approx(1.0, abs=1e-6)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000

    code, out, err = run(capsys, "--home", home, "report", "similarity")
    assert code == 0, err
    assert "orient1" in out and "group" in out and "1.00" in out

    code, out, err = run(capsys, "--home", home, "report", "similarity", "--classes", "0")
    assert code == 2 and "--data" in err
    code, out, err = run(capsys, "--home", home, "report", "similarity", "--data",
                         f"imagefolder:{tmp_path / 'nowhere'}")
    assert code == 1
    assert_one_line_error(err, "nowhere")


def test_similarity_on_a_base_without_tasks(tmp_path, capsys):
    folder = make_imagefolder(tmp_path / "d", seed=5)
    home = tmp_path / "home"
    with Manager(home) as m:
        m.add_base("b", "timm:test_resnet")
        rep = m.similarity(data=f"imagefolder:{folder}", img_size=SIZE)
    assert rep.tasks == () and rep.candidate_row == () and rep.closest is None
    assert rep.to_json() == {"base": "b", "tasks": [], "matrix": [], "without_signature": [],
                             "candidate": {"name": f"imagefolder:{folder}", "row": [],
                                           "closest": None}}
    with pytest.raises(TapsError, match="no task has a signature"):
        plots.plot_similarity(rep, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
    code, out, err = run(capsys, "--home", str(home), "report", "similarity")
    assert code == 0 and "no task has a signature" in out
    code, out, err = run(capsys, "--home", str(home), "report", "similarity", "--plot",
                         str(tmp_path / "y.png"))
    assert code == 1
    assert_one_line_error(err, "no task has a signature")
