"""The multi-task model: every method equals its restored model, mixed batches, tensors held
once, the segment plan, adding tasks to a running model; on timm's tiny EfficientNet and on
torchvision's ResNet-18."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load
from torch import nn

import taps_cl.serialization as serialization
from registry import RegistryError
from taps_cl.cli.render import plan_text
from taps_cl.errors import TapsError
from taps_cl.manager import Manager
from taps_cl.methods.catalog import load_builtin
from taps_cl.models.stages import decompose
from taps_cl.serving import tree
from taps_cl.serving.lowrank import LowRankDelta
from taps_cl.serving.multitask import MultiTaskModel, UnknownTask, build_multitask
from taps_cl.tasks.probes import PROBE_ATOL, PROBE_RTOL

# One torch thread: a second busy process on 2 cores makes OpenMP threads spin-wait.
pytestmark = pytest.mark.usefixtures("one_thread")
ARCHS = ["timm:test_efficientnet", "torchvision:resnet18"]
# Small and quick: no re-check of earlier tasks on each add (tests/test_tasks.py covers it).
FAST = dict(epochs=1, batch_size=16, seed=0, max_train=24, max_test=16, recheck=0)
# Input sizes: ResNet-18 reaches 1×1 maps at 16 px already.
SIZES = {"timm:test_efficientnet": 32, "torchvision:resnet18": 16}
PROG = dict(shared_fraction=0.4, task_fraction=0.2)
PROGRESSIVE = ("p1", "p2", "p3", "p4")
# Built once per test process (tests/test_predict_many.py reads the same registries).
_HOMES: dict[str, Path] = {}


def build_registry(home: Path, arch: str, three: str, four: str) -> Path:
    """One task per method of the catalog (named after it; methods added later are picked up
    with their default options), a second linear task, a low-rank TAPS task, a TAPS task that
    leaves the norm layers to the base and keeps few layers (`taps_base`), a fusion task over
    the adapter task, and four progressive tasks trained as a group (two similarity groups)."""
    torch.manual_seed(0)
    fast = dict(FAST, img_size=SIZES[arch])
    with Manager(home) as m:
        m.add_base("b", arch)
        for method in sorted(load_builtin()):
            if method not in ("fusion", "progressive"):
                m.add_task(method, "b", three, method=method, **fast)
        m.add_task("linear2", "b", four, method="linear", **fast)
        m.add_task("taps_r", "b", four, method="taps", rank=2, **fast)
        m.add_task("taps_base", "b", four, method="taps", norms="base", budget=0.1, **fast)
        m.add_task("fusion", "b", four, method="fusion", method_options={"fuse": "adapter"},
                   **fast)
        m.group_train("b", list(zip(PROGRESSIVE, (three, four, three, four))), groups=2,
                      **PROG, **fast)
    return home


def registry_home(tmp_path_factory, arch: str, image_data: Path, image_data4: Path) -> Path:
    if arch not in _HOMES:
        home = tmp_path_factory.mktemp(arch.replace(":", "_")) / "home"
        before = torch.get_num_threads()
        torch.set_num_threads(1)  # see tests/conftest.py's one_thread
        try:
            _HOMES[arch] = build_registry(home, arch, f"imagefolder:{image_data}",
                                          f"imagefolder:{image_data4}")
        finally:
            torch.set_num_threads(before)
    return _HOMES[arch]


@dataclass
class Served:
    """A registry, the multi-task model of all its ready tasks, and references: every task's
    restored model's logits on `images` (probe images of several tasks and random ones), and
    the numbers its restored state dict holds."""

    home: Path
    model: MultiTaskModel
    manager: Manager
    images: torch.Tensor
    logits: dict[str, torch.Tensor]
    restored_numbers: dict[str, int]


@pytest.fixture(scope="session", params=ARCHS, ids=["timm", "torchvision"])
def served(request, tmp_path_factory, image_data, image_data4):
    home = registry_home(tmp_path_factory, request.param, image_data, image_data4)
    manager = Manager(home)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = manager.serving()
        names = list(model.tasks)
        size = model.tasks[names[0]].input_size
        images = torch.cat([probe(manager, n)["inputs"][:2] for n in names[:4]]
                           + [torch.randn(4, *size, generator=torch.Generator().manual_seed(0))])
        logits, numbers = {}, {}
        for name in names:  # each task restored once
            restored = manager.restore(name)
            with torch.no_grad():
                logits[name] = restored(images)
            numbers[name] = sum(t.numel() for t in restored.state_dict().values())
    finally:
        torch.set_num_threads(before)
    yield Served(home, model, manager, images, logits, numbers)
    manager.close()


def probe(m: Manager, name: str) -> dict[str, torch.Tensor]:
    return load(m.registry.read_artifact(m.get_task(name).probe))


def tolerance(reference: torch.Tensor) -> float:
    return PROBE_ATOL + PROBE_RTOL * float(reference.abs().max())


# ------------------------------------------------------------------------------ equivalence


def test_every_method_equals_its_restored_model(served):
    model, m = served.model, served.manager
    assert isinstance(model, MultiTaskModel) and isinstance(model, nn.Module)
    methods = {t.method for t in model.tasks.values()}
    assert methods == set(load_builtin())  # every method of the catalog is served here
    assert list(model.tasks) == [t.name for t in m.list_tasks("b")]  # registry order
    images = served.images
    for name in model.tasks:
        got = torch.stack([out[name] for out in model(images, [[name]] * len(images))])
        want = served.logits[name]
        assert got.shape == want.shape
        assert float((got - want).abs().max()) <= tolerance(want), name


def test_mixed_batch_equals_per_task_runs(served):
    """Each image its own task, some images several: each logit as its task's model gives it."""
    model, images = served.model, served.images
    names = list(model.tasks)
    wanted = [[names[i % len(names)]] for i in range(len(images))]
    wanted[0] = names  # every task on the first image
    wanted[3] = [names[-1], names[0], names[-1]]  # repeated names are answered once
    outs = model(images, wanted)
    for name in names:
        rows = [i for i, w in enumerate(wanted) if name in w]
        want = served.logits[name][rows]
        got = torch.stack([outs[i][name] for i in rows])
        assert float((got - want).abs().max()) <= tolerance(want), name
    assert list(outs[3]) == [names[-1], names[0]]
    assert list(outs[0]) == names


def test_run_preprocesses_as_predict_does(served, image_data):
    model = served.model
    files = sorted((image_data / "test" / "checker").glob("*.png"))[:3]
    pictures = [Image.open(f) for f in files]
    names = list(model.tasks)[:2]
    outs = model.run(pictures, [names] * 3)
    batch = torch.stack([model.load_image(names[0], str(f)) for f in files])
    assert torch.equal(batch[0], model.preprocess(names[0], pictures[0]))
    direct = model(batch, [names] * 3)
    for got, want in zip(outs, direct):
        assert list(got) == names
        assert all(torch.equal(got[n], want[n]) for n in names)


def test_unknown_task_wrong_size_and_training_are_refused(served):
    model = served.model
    name = next(iter(model.tasks))
    size = model.tasks[name].input_size
    assert model.tasks[name].to_json()["input_size"] == [3, size[1], size[1]]
    with pytest.raises(UnknownTask, match="'nope'"):
        model(torch.zeros(1, *size), [["nope"]])
    with pytest.raises(TapsError, match=rf"3×{size[1]}×{size[1]} images, got 3×40×40"):
        model(torch.zeros(1, 3, 40, 40), [[name]])
    with pytest.raises(TapsError, match="inference only"):
        model.train()


# ---------------------------------------------------------------------------------- memory


def stored_numbers(m: Manager, names: list[str]) -> int:
    """The base without its head (buffers included), each task's artifact and each shared
    artifact the tasks read, once: everything the registry stores for them."""
    base = m.get_base("b")
    state = serialization.from_bytes(m.registry.read_artifact(base.weights))
    total = sum(v.numel() for k, v in state.items() if k not in set(base.head_keys))
    shared = set()
    for name in names:
        task = m.get_task(name)
        tensors = serialization.from_bytes(m.registry.read_artifact(task.artifact))
        total += sum(v.numel() for v in tensors.values())
        shared |= {p.sha256 for p in task.depends_on if p.task is None}
    for sha in shared:
        tensors = serialization.from_bytes(m.registry.read_artifact(m.registry.get_artifact(sha)))
        total += sum(v.numel() for v in tensors.values())
    return total


def test_memory_is_base_plus_what_the_tasks_store(served):
    """Every tensor held is a base tensor or one a task stores (low-rank factors as factors,
    the base's original head not at all), each content once: at most what the registry stores.
    Only tensors equal by content are merged, and trained tensors differ, so it is not far
    below (the slack is the base's tensors that every task replaces, and equal small buffers)."""
    model = served.model
    held = model.footprint()["numbers"]
    stored = stored_numbers(served.manager, list(model.tasks))
    assert 0.9 * stored <= held <= stored
    assert held < sum(served.restored_numbers.values()) / 2


def test_shared_stages_hold_the_same_tensors(served):
    model = served.model
    models = {e: model._state.entries[e].model for e in model.tasks}
    first = model._state.entries["linear"].decomposition.stages[0].modules[0]

    def ptrs(name: str, path: str) -> list[int]:
        return [p.data_ptr() for p in models[name].get_submodule(path).parameters()]

    # The stem is the base's for every task that does not change it, whatever its method.
    for name in ("linear", "linear2", "adapter", "fusion", *PROGRESSIVE):
        assert ptrs(name, first) == ptrs("linear", first)
    # Progressive: the shared band (adapters and norms) is one set of tensors.
    band = sorted({k.split(".")[1] for k in models["p1"].state_dict()
                   if k.startswith("taps_progressive.")})[0]
    path = f"taps_progressive.{band}"
    assert ptrs("p1", path) == ptrs("p2", path) == ptrs("p3", path) == ptrs("p4", path)
    # Fusion reads the adapter task's adapters: held once.
    adapter = {p.data_ptr() for p in models["adapter"].taps_adapters.parameters()}
    fused = {p.data_ptr() for k, p in models["fusion"].named_parameters() if ".dep0." in k}
    assert fused and fused <= adapter


def test_low_rank_deltas_are_kept_as_factors(served):
    model, m = served.model, served.manager
    layers = [(n, mod) for n, mod in model._state.entries["taps_r"].model.named_modules()
              if isinstance(mod, LowRankDelta)]
    assert layers
    tensors = serialization.from_bytes(m.registry.read_artifact(m.get_task("taps_r").artifact))
    linear = model._state.entries["linear"].model
    for name, layer in layers:
        assert f"factor_b/{name}.weight" in tensors
        # The base weight under the factors is the one the linear task runs.
        assert layer.base.weight.data_ptr() == linear.get_submodule(name).weight.data_ptr()


# ------------------------------------------------------------------------------------ plan


def test_plan_shares_the_progressive_prefix_and_says_what_differs(served):
    model = served.model
    plan = model.plan()
    by_tasks = {s.tasks: s for s in plan.segments}
    (b,) = plan.bases
    assert b.family != "whole" and b.whole == ()
    stages = list(b.stages)
    # Progressive: one segment for all four (the stem and the shared band), then groups, then
    # each task alone; the split points are block boundaries.
    prefix = next(s for s in plan.segments if set(PROGRESSIVE) <= set(s.tasks)
                  and not set(s.tasks) - set(PROGRESSIVE))
    assert prefix.parent is not None and prefix.stages[-1] != "head"
    groups = [s for s in plan.segments if s.parent == prefix.id]
    assert len(groups) == 2 and sorted(t for g in groups for t in g.tasks) == sorted(PROGRESSIVE)
    leaves = [s for s in plan.segments if len(s.tasks) == 1 and s.tasks[0] in PROGRESSIVE]
    assert len(leaves) == 4 and all(s.last == "head" and "head" in s.differs for s in leaves)
    # The stem convolution is the base's for every task that does not change it.
    root = next(s for s in plan.segments if s.parent is None and "linear" in s.tasks)
    assert set(root.tasks) >= {"linear", "linear2", "adapter", "fusion", *PROGRESSIVE}
    assert root.differs == () and root.first == stages[0]
    # The two linear tasks share everything but the head, and change nothing else.
    linear = [s for s in plan.segments if {"linear", "linear2"} <= set(s.tasks)]
    assert linear[-1].last == stages[-2] and all(s.differs == () for s in linear)
    # TAPS's default re-estimates every norm, fine-tuning changes everything: nothing shared.
    for name in ("taps", "taps_r", "finetune"):
        own = by_tasks[(name,)]
        assert own.parent is None and own.first == stages[0] and own.last == "head"
        assert {"norms", "head"} <= set(own.differs)
    assert sum(s.share for s in plan.segments) == pytest.approx(1.0)
    assert plan.separate_macs > plan.shared_macs > 0
    assert all(s.macs >= 0 and 0 <= s.fraction <= 1 + 1e-9 for s in plan.segments)
    document = plan.to_json()
    assert document["segments"][0]["flops"] == 2 * document["segments"][0]["macs"]
    text = "\n".join(plan_text(plan))
    assert "nothing (the base's layers)" in text and "p1" in text


def test_a_task_with_base_norms_branches_at_its_first_active_layer(served):
    """`taps_base` leaves every norm to the base: it computes the base's function (and shares
    the linear tasks' segments) up to the first stage holding one of its active layers."""
    model, m = served.model, served.manager
    plan = model.plan()
    stages = [s.modules for s in model._state.entries["linear"].decomposition.stages]
    active = [layer.name for layer in m.get_task("taps_base").layers if layer.active]

    def stage_of(layer: str) -> int:
        return next(i for i, paths in enumerate(stages)
                    if any(layer == p or layer.startswith(f"{p}.") for p in paths))

    expected = min((stage_of(name) for name in active), default=len(stages) - 1)
    mine = [s for s in plan.segments if "taps_base" in s.tasks]
    own = next(s for s in mine if "linear" not in s.tasks)
    assert plan.bases[0].stages.index(own.first) == expected
    assert all("norms" not in s.differs for s in mine)
    assert all(s.differs == () for s in mine if "linear" in s.tasks)


# --------------------------------------------------------------------------- adding tasks


def test_add_tasks_keeps_what_is_loaded(served, tmp_path):
    home, full, m = served.home, served.model, served.manager
    model = build_multitask(m, ["linear", "p1"])
    before = {n: model._state.entries[n] for n in model.tasks}
    added = model.add_tasks(m, ["p2", "linear", "taps"])
    assert added == ["p2", "taps"] and model.add_tasks(m, ["p2"]) == []
    assert all(model._state.entries[n] is e for n, e in before.items())
    assert list(model.tasks) == [n for n in full.tasks if n in {"linear", "p1", "p2", "taps"}]
    images = served.images
    for name in ("p2", "taps"):
        got = torch.stack([o[name] for o in model(images, [[name]] * len(images))])
        want = served.logits[name]
        assert float((got - want).abs().max()) <= tolerance(want), name
    # A task whose files were changed is refused, and nothing of the call is added.
    copy = tmp_path / "home"
    shutil.copytree(home, copy)
    with Manager(copy) as changed:
        task = changed.get_task("linear2")
        path = changed.registry.store.path_of(task.artifact.path)
        path.write_bytes(path.read_bytes()[:-1] + b" ")
        fresh = build_multitask(changed, ["linear"])
        with pytest.raises((TapsError, RegistryError)):
            fresh.add_tasks(changed, ["taps", "linear2"])
        assert list(fresh.tasks) == ["linear"]


# ------------------------------------------------------------------------ stages, unit level


def test_unknown_architecture_runs_whole_and_a_stray_hook_is_not_lost():
    import timm

    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(x) * 2

    assert not decompose(Odd().eval(), torch.zeros(1, 4)).staged
    model = timm.create_model("test_efficientnet", num_classes=3).eval()
    example = torch.randn(2, 3, 32, 32)
    assert decompose(model, example).family == "timm EfficientNet"
    model.register_forward_hook(lambda mod, args, out: out + 1)  # on the root: no stage runs it
    assert not decompose(model, example).staged


def test_tree_splits_where_keys_differ_and_never_joins_again():
    keys = {"a": ["s", "x", "y", "h1"], "b": ["s", "x", "y", "h2"], "c": ["s", "z", "y", "h3"],
            "d": ["t", "x", "y", "h4"]}
    roots = tree.build(list(keys), keys)
    shape = [(depth, s.first, s.last, s.tasks) for depth, _, s in tree.walk(roots)]
    assert shape == [(0, 0, 0, ("a", "b", "c")), (1, 1, 2, ("a", "b")), (2, 3, 3, ("a",)),
                     (2, 3, 3, ("b",)), (1, 1, 3, ("c",)), (0, 0, 3, ("d",))]


def test_module_keys_follow_content_not_identity():
    """Two separately built models with equal weights share every stage; changing one late
    weight splits them from that stage on (what lets a task with base norms share a prefix)."""
    import timm

    from taps_cl.models.stages import decompose as cut
    from taps_cl.serving.identity import KeyCache, TensorPool

    torch.manual_seed(0)
    a = timm.create_model("test_efficientnet", num_classes=3).eval()
    b = timm.create_model("test_efficientnet", num_classes=3).eval()
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        b.conv_head.weight.add_(0.5)
    pool = TensorPool(torch.device("cpu"))
    stages = cut(a, torch.zeros(1, 3, 32, 32)).stages
    keys = []
    for model in (a, b):
        cache = KeyCache(pool)
        keys.append([cache.key(model.get_submodule(s.modules[0])) for s in stages[:-1]])
    split = next(i for i, (x, y) in enumerate(zip(*keys)) if x != y)
    assert stages[split].name == "conv_head"
