"""Progressive adaptation end to end: shared, group and task bands,
joining without rewriting, `group train`, budget, lifecycle, errors, signatures, determinism."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load
from sqlalchemy import text

import taps_cl
from registry import chain, db
from taps_cl import serialization
from taps_cl.cli.app import main
from taps_cl.errors import TapsError
from taps_cl.manager import Manager
from taps_cl.methods.progressive.sharing import new_group_name, sharing_of
from taps_cl.tasks.planning import earlier_task
from tests.conftest import make_imagefolder
from tests.test_cli import assert_one_line_error, run

FAST = {"epochs": 1, "batch_size": 16, "img_size": 32, "seed": 0}
# test_efficientnet has 5 blocks: 2 shared, 2 group, 1 task-specific (the defaults would leave
# the group band empty on so small a model).
PROG = {"shared_fraction": 0.4, "task_fraction": 0.2}
PROG_ARGS = ("--shared-fraction", "0.4", "--task-fraction", "0.2")
SHARED, GROUP = "progressive_shared", "progressive_group"


# ------------------------------------------------------------------------------------ helpers


def files(m: Manager) -> dict[str, bytes]:
    """Every recorded artifact's bytes on disk, by sha256."""
    return {a.sha256: Path(m.registry.store.path_of(a.path)).read_bytes()
            for a in m.registry.list_artifacts()}


def pins(task) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """Pin kind → sha256 of a task's shared artifacts (asserting it pins no task)."""
    assert all(p.task is None for p in task.depends_on), task.depends_on
    out = {p.kind: p.sha256 for p in task.depends_on}
    assert len(out) == len(task.depends_on)
    return out


def probe_of(m: Manager, name: str) -> dict[str, torch.Tensor]:
    return load(m.registry.read_artifact(m.get_task(name).probe))


def restored_logits(m: Manager, name: str) -> torch.Tensor:
    with torch.no_grad():
        return m.restore(name)(probe_of(m, name)["inputs"])


def cli(*args: str) -> tuple[int, str]:
    """The CLI in-process, outside pytest's capture (for module fixtures): (exit code, stdout)."""
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            main(list(args))
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    return code, out.getvalue()


def copy_home(src: Path | str, dst: Path) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def unfinished_rows(m: Manager) -> int:
    with m.registry.engine.connect() as conn:
        return int(conn.execute(text("SELECT COUNT(*) FROM tasks WHERE status != 'ready'"))
                   .scalar_one())


def failed_checks(m: Manager) -> list:  # type: ignore[type-arg]
    return [c for c in m.verify() if not c.ok]


# ----------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def specs(tmp_path_factory, image_data, image_data4) -> tuple[str, str, str]:
    two = make_imagefolder(tmp_path_factory.mktemp("patterns2"), ("checker", "blob"), seed=2)
    return f"imagefolder:{image_data}", f"imagefolder:{image_data4}", f"imagefolder:{two}"


@pytest.fixture(scope="module")
def incremental(tmp_path_factory, specs):
    """p1 (the base's first progressive task), p2 (`--group new`), p3 (joins group p1 by name,
    options inherited), p4 (`--group auto`, threshold -1: joins the most similar group).

    Returns (home, snapshots): before each add, (the task about to be added, every file's bytes,
    the restored probe logits of every task there was)."""
    home = tmp_path_factory.mktemp("incremental") / "home"
    three, four, _ = specs
    plan = [("p1", three, None, PROG, {}), ("p2", four, "new", PROG, {}),
            ("p3", four, "p1", None, {}), ("p4", three, "auto", PROG, {"join_threshold": -1.0})]
    snapshots = []
    with Manager(home) as m:
        m.add_base("b", "timm:test_efficientnet")
        for name, spec, group, options, extra in plan:
            snapshots.append((name, files(m),
                              {t.name: restored_logits(m, t.name) for t in m.list_tasks()}))
            m.add_task(name, "b", spec, method="progressive", method_options=options,
                       group=group, **extra, **FAST)
    return home, snapshots


@pytest.fixture(scope="module")
def grouped(tmp_path_factory, specs):
    """`group train` x, y, z into 2 groups (CLI), then w joins by `task add --group auto` (CLI),
    then a second `group train` u, v on the same base (Manager). Returns (home, documents)."""
    home = str(tmp_path_factory.mktemp("grouped") / "home")
    three, four, two = specs
    seeded_base(home)
    code, out = cli(*group_train_args(home, specs))
    assert code == 0, out
    first = json.loads(out)
    code, out = cli("--home", home, "--json", "task", "add", "w", "--base", "b", "--data", four,
                    "--method", "progressive", "--group", "auto", "--join-threshold", "-1",
                    "--epochs", "1", "--img-size", "32", "--batch-size", "16")
    assert code == 0, out
    joined = json.loads(out)
    with Manager(home) as m:
        second = m.group_train("b", [("u", two), ("v", three)], groups=1, **FAST)
    return home, {"first": first, "joined": joined, "second": second}


def seeded_base(home: str) -> str:
    """Base b: a test_efficientnet with seeded random weights (the same in every home)."""
    torch.manual_seed(0)
    with Manager(home) as m:
        return m.add_base("b", "timm:test_efficientnet").sha256


def group_train_args(home: str, specs: tuple[str, str, str]) -> list[str]:
    three, four, two = specs
    return ["--home", home, "--json", "group", "train", "--base", "b",
            "--task", f"x={three}", "--task", f"y={four}", "--task", f"z={two}",
            "--groups", "2", "--epochs", "1", "--img-size", "32", "--batch-size", "16",
            *PROG_ARGS]


# ------------------------------------------------------------------------ 1. incremental joins


def test_first_task_trains_all_bands_and_pins_shared_and_group(incremental):
    home, _ = incremental
    with Manager(home) as m:
        p1 = m.get_task("p1")
        assert p1.method_config["train_bands"] == ["shared", "group", "task"]
        assert p1.method_config["group"] == "p1"
        assert p1.method_config["shared_fraction"] == 0.4
        p1_pins = pins(p1)
        assert set(p1_pins) == {SHARED, GROUP}
        bands = {}
        for kind, sha in p1_pins.items():
            artifact = m.registry.get_artifact(sha)
            assert artifact.kind == "shared" and artifact.num_params > 0
            blob = m.registry.read_artifact(artifact)
            meta = serialization.metadata_from_bytes(blob)
            assert meta["band"] == {SHARED: "shared", GROUP: "group"}[kind]
            bands[meta["band"]] = serialization.from_bytes(blob)
        # Trained: the adapters' up projections start at zero and moved in every band.
        own = load(m.registry.read_artifact(p1.artifact))
        for tensors in (*bands.values(), own):
            ups = [v for k, v in tensors.items() if k.startswith("module/") and ".up." in k]
            assert ups and all(v.abs().sum() > 0 for v in ups)
        # Each band stored once: the task artifact holds none of the shared tensors.
        assert not set(own) & set(bands["shared"]) and not set(own) & set(bands["group"])
        assert not set(bands["shared"]) & set(bands["group"])
        kinds = [layer.kind for layer in p1.layers]
        assert kinds == ["shared_adapter"] * 2 + ["group_adapter"] * 2 + ["adapter"]
        assert [layer.task_params > 0 for layer in p1.layers] == [False] * 4 + [True]


def test_new_group_and_joins_pin_exactly_the_group_s_artifacts(incremental):
    home, snapshots = incremental
    before = {name: set(saved) for name, saved, _ in snapshots}
    with Manager(home) as m:
        p1, p2, p3, p4 = (m.get_task(n) for n in ("p1", "p2", "p3", "p4"))
        # --group new: the same shared band, a new group artifact of its own.
        assert p2.method_config["group"] == "p2"
        assert p2.method_config["train_bands"] == ["group", "task"]
        assert pins(p2)[SHARED] == pins(p1)[SHARED]
        assert pins(p2)[GROUP] != pins(p1)[GROUP]
        assert pins(p2)[GROUP] not in before["p2"]
        # Joining by name (options inherited from the base's shared band): task band only.
        assert p3.method_config["group"] == "p1"
        assert p3.method_config["train_bands"] == ["task"]
        assert p3.method_config["shared_fraction"] == 0.4
        assert pins(p3) == pins(p1)
        # --group auto with threshold -1 always joins one of the groups, never opens one.
        assert p4.method_config["group"] in ("p1", "p2")
        assert p4.method_config["train_bands"] == ["task"]
        assert pins(p4) == pins(m.get_task(p4.method_config["group"]))
        shared = sorted(a.sha256 for a in m.registry.list_artifacts() if a.kind == "shared")
        assert shared == sorted({pins(p1)[SHARED], pins(p1)[GROUP], pins(p2)[GROUP]})
        # What a joiner stores: only its task band and head.
        own = load(m.registry.read_artifact(p3.artifact))
        assert {k.split("/")[0] for k in own} == {"module", "set"}
        assert set(own) == set(load(m.registry.read_artifact(p1.artifact)))


def test_joining_never_rewrites_earlier_tasks(incremental):
    home, snapshots = incremental
    with Manager(home) as m:
        now = files(m)
        restored = {name: restored_logits(m, name) for name in ("p1", "p2", "p3")}
        for added, saved, logits in snapshots:
            # Every file recorded before this add is still there, byte for byte, and every
            # earlier task computes exactly the logits it computed then.
            assert all(now[sha] == blob for sha, blob in saved.items()), added
            assert len(logits) == ["p1", "p2", "p3", "p4"].index(added)
            for name, value in logits.items():
                assert torch.equal(restored[name], value), (added, name)
        checks = m.verify()
        assert [c.task for c in checks] == ["p1", "p2", "p3", "p4"]
        assert all(c.ok and c.max_drift is not None and c.max_drift <= 1e-5 for c in checks)


def test_every_task_restores_its_probe_and_exports_without_registry(incremental, tmp_path):
    home, _ = incremental
    with Manager(home) as m:
        for name in ("p1", "p2", "p3", "p4"):
            probe = probe_of(m, name)
            assert (restored_logits(m, name) - probe["logits"]).abs().max() <= 1e-5
            out = m.restore_to_file(name, tmp_path / f"{name}.safetensors")
            with torch.no_grad():
                exported = taps_cl.load_file(out)(probe["inputs"])
            assert (exported - probe["logits"]).abs().max() <= 1e-5, name
    meta = serialization.metadata_from_bytes((tmp_path / "p3.safetensors").read_bytes())
    deps = serialization.json_field(meta, "dependencies")
    assert sorted(d["name"] for d in deps) == ["group p1", "shared band"]


# ----------------------------------------------------------------------------- 2. group train


def test_group_train_json_and_sharing(grouped):
    home, docs = grouped
    first = docs["first"]
    assert set(first) >= {"tasks", "groups", "similarity"}
    assert [t["name"] for t in first["tasks"]] == ["x", "y", "z"]
    assert first["similarity"]["tasks"] == ["x", "y", "z"]
    matrix = first["similarity"]["matrix"]
    assert len(matrix) == 3 and all(len(row) == 3 for row in matrix)
    assert all(abs(matrix[i][i] - 1) < 1e-5 for i in range(3))
    assert all(abs(matrix[i][j] - matrix[j][i]) < 1e-6 for i in range(3) for j in range(3))
    groups = first["groups"]
    assert len(groups) == 2 and sorted(n for members in groups.values() for n in members) == [
        "x", "y", "z"]
    with Manager(home) as m:
        tasks = {n: m.get_task(n) for n in ("x", "y", "z")}
        shared = {pins(t)[SHARED] for t in tasks.values()}
        assert len(shared) == 1
        for group, members in groups.items():
            assert {tasks[n].method_config["group"] for n in members} == {group}
            assert len({pins(tasks[n])[GROUP] for n in members}) == 1
            assert all(tasks[n].method_config["train_bands"] == ["shared", "group", "task"]
                       for n in members)
        assert len({pins(t)[GROUP] for t in tasks.values()}) == 2
        for t in first["tasks"]:
            assert t["group"] == tasks[t["name"]].method_config["group"]
            assert t["method"] == "progressive" and t["status"] == "ready"
        assert [t.position for t in tasks.values()] == [1, 2, 3]
        assert not failed_checks(m)


def test_task_add_auto_joins_a_trained_group(grouped):
    home, docs = grouped
    assert docs["joined"]["name"] == "w"
    with Manager(home) as m:
        w = m.get_task("w")
        assert w.method_config["group"] in docs["first"]["groups"]
        assert w.method_config["train_bands"] == ["task"]
        assert pins(w) == pins(m.get_task(w.method_config["group"]))


def test_second_group_train_reuses_the_shared_band_frozen(grouped):
    home, docs = grouped
    second = docs["second"]
    assert second.groups == {"u": ["u", "v"]}
    with Manager(home) as m:
        x, u, v = m.get_task("x"), m.get_task("u"), m.get_task("v")
        for t in (u, v):
            assert t.method_config["train_bands"] == ["group", "task"]
            assert t.method_config["group"] == "u"
            assert pins(t)[SHARED] == pins(x)[SHARED]
        assert pins(u)[GROUP] == pins(v)[GROUP]
        assert pins(u)[GROUP] not in {pins(m.get_task(n))[GROUP] for n in ("x", "y", "z")}
        assert [a.kind for a in m.registry.list_artifacts()].count("shared") == 4  # 1 + 3 groups
        uses = {use.sha256: use for use in m.registry.list_shared("b")}
        assert uses[pins(x)[SHARED]].tasks == ("x", "y", "z", "w", "u", "v")


# ---------------------------------------------------------------------------------- 3. budget


def test_budget_counts_each_shared_artifact_once(grouped, capsys):
    home, _ = grouped
    code, out, _ = run(capsys, "--home", home, "--json", "report", "budget")
    assert code == 0
    doc = json.loads(out)
    with Manager(home) as m:
        base = m.get_base("b")
        tasks = [t for t in m.list_tasks("b") if t.status == "ready"]
        own = {t.artifact.sha256: t.artifact.num_params for t in tasks}
        readers: dict[str, list[str]] = {}
        for t in tasks:
            for p in t.depends_on:
                readers.setdefault(p.sha256, []).append(t.name)
        by_sha = {a.sha256: a for a in m.registry.list_artifacts()}
        assert {sha for sha, a in by_sha.items() if a.kind == "shared"} == set(readers)
        expected = (base.num_params + sum(own.values())
                    + sum(by_sha[sha].num_params for sha in readers))
    assert doc["total_params"] == expected
    assert sorted(e["sha256"] for e in doc["shared"]) == sorted(readers)
    for entry in doc["shared"]:
        assert {"sha256", "num_params", "tasks"} <= set(entry)
        assert entry["num_params"] == by_sha[entry["sha256"]].num_params
        assert entry["tasks"] == readers[entry["sha256"]]
    code, out, _ = run(capsys, "--home", home, "report", "budget")
    assert code == 0 and out.count("counted once") == len(readers)


# ------------------------------------------------------------------------------- 4. lifecycle


def test_delete_keeps_pinned_shared_artifacts_and_drops_the_last_member_s(grouped, tmp_path):
    home = copy_home(grouped[0], tmp_path / "home")
    with Manager(home) as m:
        tasks = {t.name: t for t in m.list_tasks("b")}
        shared_sha = pins(tasks["x"])[SHARED]
        members: dict[str, list[str]] = {}
        for t in tasks.values():
            members.setdefault(pins(t)[GROUP], []).append(t.name)
        group_sha, names = next((sha, ns) for sha, ns in members.items() if len(ns) >= 2)
        path = Path(m.registry.store.path_of(m.registry.get_artifact(group_sha).path))
        shared_path = Path(m.registry.store.path_of(m.registry.get_artifact(shared_sha).path))
        for i, name in enumerate(names):
            before = files(m)
            removed = m.delete_task(name)
            last = i == len(names) - 1
            after = files(m)
            assert (group_sha in after) is not last and path.exists() is not last
            assert shared_sha in after and shared_path.exists()
            gone = set(before) - set(after)
            own = {tasks[name].artifact.sha256, tasks[name].probe.sha256,
                   tasks[name].signature.sha256}
            assert gone == own | ({group_sha} if last else set()) and len(removed) == len(gone)
            assert all(before[sha] == blob for sha, blob in after.items())
            assert not failed_checks(m)
        assert m.registry.chain_problems("b") == {}


def test_tampered_shared_artifact_fails_verify_for_every_reader(grouped, tmp_path, capsys):
    home = copy_home(grouped[0], tmp_path / "home")
    with Manager(home) as m:
        tasks = {t.name: t for t in m.list_tasks("b")}
        group_sha = pins(tasks["u"])[GROUP]  # u and v only
        shared_sha = pins(tasks["u"])[SHARED]  # everyone
        paths = {sha: Path(m.registry.store.path_of(m.registry.get_artifact(sha).path))
                 for sha in (group_sha, shared_sha)}
    for sha, readers in ((group_sha, {"u", "v"}), (shared_sha, set(tasks))):
        path = paths[sha]
        original = path.read_bytes()
        path.chmod(0o644)
        path.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        code, out, err = run(capsys, "--home", home, "--json", "report", "accuracy", "--verify")
        assert code == 1
        assert_one_line_error(err, "verification failed")
        doc = json.loads(out)
        assert doc["verified"] is False
        for name in tasks:
            lines = [p for p in doc["problems"] if p.startswith(f"{name}: ")]
            if name in readers:
                assert len(lines) == 1 and f"shared artifact {sha[:12]}" in lines[0], lines
            else:
                assert not lines, lines
        path.write_bytes(original)
    with Manager(home) as m:
        assert not failed_checks(m)


# ---------------------------------------------------------------------------------- 5. errors


@pytest.fixture()
def progressive_copy(incremental, tmp_path) -> str:
    return copy_home(incremental[0], tmp_path / "home")


def assert_unchanged(capsys, home: str, listing: str, saved: dict[str, bytes]) -> None:
    code, out, _ = run(capsys, "--home", home, "--json", "task", "list")
    assert code == 0 and out == listing
    with Manager(home) as m:
        assert unfinished_rows(m) == 0
        assert files(m) == saved


@pytest.mark.parametrize("args, pattern", [
    (["--method", "progressive", "--group", "nosuch"], "no group 'nosuch'"),
    (["--method", "adapter", "--group", "p1"], "--group applies to --method progressive"),
    (["--method", "adapter", "--join-threshold", "0.3"],
     "--join-threshold applies to --method progressive"),
    (["--method", "progressive", "--shared-fraction", "0.6"], "disagree"),
])
def test_task_add_errors_leave_nothing_behind(progressive_copy, specs, capsys, args, pattern):
    home = progressive_copy
    _, listing, _ = run(capsys, "--home", home, "--json", "task", "list")
    with Manager(home) as m:
        saved = files(m)
    code, _, err = run(capsys, "--home", home, "task", "add", "q", "--base", "b", "--data",
                       specs[2], "--epochs", "1", "--img-size", "32", *args)
    assert code == 1
    assert_one_line_error(err, pattern)
    assert_unchanged(capsys, home, listing, saved)


@pytest.mark.parametrize("tasks, extra, code_expected, pattern", [
    (["a=S0", "a=S1"], [], 1, "names repeat"),
    (["p1=S0", "c=S1"], [], 1, "'p1' already exists"),
    (["a=S0", "c=S1"], ["--groups", "3"], 1, "between 1 and the number of tasks"),
    (["a=S0", "c=S1"], ["--groups", "0"], 2, None),
])
def test_group_train_errors_leave_nothing_behind(progressive_copy, specs, capsys, tasks, extra,
                                                 code_expected, pattern):
    home = progressive_copy
    _, listing, _ = run(capsys, "--home", home, "--json", "task", "list")
    with Manager(home) as m:
        saved = files(m)
    given = [arg for t in tasks for arg in ("--task", t.replace("S0", specs[0])
                                            .replace("S1", specs[2]))]
    code, _, err = run(capsys, "--home", home, "group", "train", "--base", "b", *given,
                       "--epochs", "1", "--img-size", "32", *extra)
    assert code == code_expected, err
    if pattern is not None:
        assert_one_line_error(err, pattern)
    else:
        assert "--groups" in err and "Traceback" not in err
    assert_unchanged(capsys, home, listing, saved)


def test_group_train_refuses_zero_groups_from_python(progressive_copy, specs):
    with Manager(progressive_copy) as m:
        saved = files(m)
        with pytest.raises(TapsError, match="between 1 and"):
            m.group_train("b", [("a", specs[0]), ("c", specs[2])], groups=0, **FAST)
        assert [t.name for t in m.list_tasks()] == ["p1", "p2", "p3", "p4"]
        assert unfinished_rows(m) == 0 and files(m) == saved


# ------------------------------------------------------------------------------ 6. signatures


def test_every_task_records_a_signature_covered_by_the_chain(incremental, grouped, tmp_path,
                                                             capsys):
    for source in (incremental[0], grouped[0]):
        with Manager(source) as m:
            for t in m.list_tasks():
                assert t.signature is not None and t.signature.kind == "signature", t.name
                assert t.signature.num_params > 0
                assert m.registry.get_artifact(t.signature.sha256).kind == "signature"
            assert m.registry.chain_problems("b") == {}
    home = copy_home(incremental[0], tmp_path / "home")
    with Manager(home) as m, m.registry.engine.begin() as conn:
        conn.execute(text("UPDATE tasks SET signature_artifact_id = NULL WHERE name = 'p2'"))
    _, out, _ = run(capsys, "--home", home, "report", "accuracy")
    assert "WARNING: hash chain broken at p2:" in out
    assert "hash chain broken at p1" not in out and "hash chain broken at p3" not in out


def _chain_at_0005(engine) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """registry.chain's verdict on the rows of a 0005 database (no Registry opens it)."""
    with engine.connect() as conn:
        weights = conn.execute(text("SELECT weights_sha256 FROM base_models")).scalar_one()
        rows = conn.execute(text(
            "SELECT t.name, t.position, a.sha256, p.sha256, t.chain_prev_sha256, t.chain_sha256 "
            "FROM tasks t JOIN artifacts a ON a.id = t.artifact_id "
            "JOIN artifacts p ON p.id = t.probe_artifact_id WHERE t.status = 'ready' "
            "ORDER BY t.position")).all()
    return chain.chain_problems(weights, [chain.ChainEntry(*row) for row in rows])


def test_migration_0006_round_trip_with_signed_tasks(incremental, tmp_path):
    home = copy_home(incremental[0], tmp_path / "home")
    with Manager(home) as m:
        m.delete_task("p2")  # a gap in the positions: the re-linked chain must cope
        reg = m.registry
        signatures = {t.name: t.signature.sha256 for t in reg.list_tasks()}
        assert all(signatures.values())
        engine = reg.engine
        db.downgrade(engine, "0005")
        assert db.current_revision(engine) == "0005"
        with engine.connect() as conn:
            kinds = {row[0] for row in conn.execute(text("SELECT kind FROM artifacts"))}
        assert "signature" not in kinds and "shared" in kinds
        assert _chain_at_0005(engine) == {}
        db.upgrade(engine)
        assert db.current_revision(engine) == db.head_revision() == "0006"
    with Manager(home) as m:
        assert m.registry.chain_problems("b") == {}
        assert all(t.signature is None for t in m.list_tasks())
        assert not failed_checks(m)
        # The signature files are garbage now, and nothing else is.
        assert {Path(g.path).stem for g in m.find_garbage()} == set(signatures.values())


# --------------------------------------------------------------------------- 7. determinism


def test_group_train_is_deterministic_in_a_fresh_home(grouped, specs, tmp_path):
    home, docs = grouped
    fresh = str(tmp_path / "home")
    with Manager(home) as m:
        assert seeded_base(fresh) == m.get_base("b").sha256
    code, out = cli(*group_train_args(fresh, specs))
    assert code == 0, out
    doc = json.loads(out)
    assert doc["groups"] == docs["first"]["groups"]
    assert doc["similarity"] == docs["first"]["similarity"]

    def shas(where: str) -> dict[str, tuple]:
        with Manager(where) as m:
            out = {}
            for name in ("x", "y", "z"):
                t = m.get_task(name)
                out[name] = (t.artifact.sha256, t.probe.sha256, t.signature.sha256,
                             tuple(sorted(pins(t).items())))
            return out

    assert shas(fresh) == shas(home)


def test_a_reused_name_does_not_merge_into_the_deleted_opener_s_group(incremental, specs,
                                                                      tmp_path):
    # p1 opened group "p1"; p3 joined it. With p1 deleted, group "p1" lives on in p3: a new task
    # named p1 opening a group must not pass as a member of p3's group (sharing_of would merge
    # them and later joiners would read p3's group adapters as the new task's).
    home = copy_home(incremental[0], tmp_path / "home")
    with Manager(home) as m:
        p3 = m.get_task("p3")
        m.delete_task("p1")
        new = m.add_task("p1", "b", specs[2], method="progressive", group="new", **FAST).task
        assert new.method_config["group"] == "p1-2"
        assert pins(new)[GROUP] != pins(p3)[GROUP] and pins(new)[SHARED] == pins(p3)[SHARED]
        # `group train` names groups the same way; "new" and "auto" are not group names.
        result = m.group_train("b", [("new", specs[0]), ("auto", specs[2])], groups=2, **FAST)
        assert result.groups == {"new-2": ["new"], "auto-2": ["auto"]}
        groups = sharing_of([earlier_task(t)
                             for t in m.registry.list_tasks("b", ready_only=True)]).groups
        assert "p3" in groups["p1"].members and "p1" not in groups["p1"].members
        assert groups["p1"].group_sha256 == pins(p3)[GROUP]
        assert groups["p1-2"].members == ("p1",) and groups["new-2"].members == ("new",)
        assert not failed_checks(m)


def test_new_group_name():
    assert new_group_name("a", ()) == "a"
    assert new_group_name("a", ("a", "a-2")) == "a-3"
    assert new_group_name("auto", ()) == "auto-2" and new_group_name("new", ("b",)) == "new-2"
