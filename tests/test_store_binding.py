"""The registry's record of its artifact store (registry.binding) survives damage and failure.

A deleted ``artifact_store`` row is reported by verification; a write naming another store
then fails and records nothing, so the registry's real store keeps working; a write that fails
records no store (the binding commits with the first artifact or not at all).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from sqlalchemy import text

from registry import IntegrityFailure, Registry, RegistryError, StoreError, StoreMismatch
from registry.store import MARKER
from tests.test_cli import assert_one_line_error, run
from tests.test_registry import add_base, begin, finish
from tests.test_registry_store import _refuse_inserts

FIXTURE = Path(__file__).parent / "fixtures" / "registry_e113eb4"


def files_under(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()} if root.exists() else {}


def store_rows(reg: Registry) -> list[tuple]:
    with reg.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(text("SELECT url, store_id FROM artifact_store"))]


def delete_store_row(reg: Registry) -> None:
    with reg.engine.begin() as conn:
        conn.execute(text("DELETE FROM artifact_store"))


def marker_id(root: Path) -> str:
    return json.loads((root / MARKER).read_text())["store_id"]


# ------------------------------------------------------------------ a deleted artifact_store row
@pytest.mark.parametrize("named", [False, True], ids=["default-store", "named-store"])
def test_deleted_row_is_reported_and_another_store_is_refused_for_writes(tmp_path, db_url,
                                                                         named):
    home, store, other = tmp_path / "home", tmp_path / "store", tmp_path / "other"
    artifacts = str(store) if named else None
    with Registry(home, db_url, artifacts=artifacts) as reg:
        add_base(reg)
        finish(reg, begin(reg, "t1"), b"task-1")
        record = reg.store_record
        reg.check_store_binding()  # whole
        delete_store_row(reg)
        with pytest.raises(IntegrityFailure, match="records no artifact store"):
            reg.check_store_binding()
    real = store if named else home / "artifacts"
    before = files_under(real)
    other.mkdir()
    # A write naming another store: refused at open, and nothing is recorded or written.
    with pytest.raises(StoreMismatch, match=r"records no artifact store, and .*other does not "
                                            r"hold its files"):
        Registry(home, db_url, artifacts=str(other))
    with Registry(home, db_url, create=False) as reg:
        assert store_rows(reg) == []
    assert files_under(other) == {} and files_under(real) == before
    # A reader still reads the real store; verification still says the record is missing.
    with Registry(home, db_url, create=False, artifacts=artifacts) as reg:
        assert reg.store_record is None
        assert reg.check_artifact(reg.get_task("t1").artifact) == b"task-1"
        with pytest.raises(IntegrityFailure, match="row is missing"):
            reg.check_store_binding()
    # The real store still works: a writer records it again (the same id, from its marker).
    with Registry(home, db_url, artifacts=artifacts) as reg:
        assert reg.store_record == record
        reg.check_store_binding()
        finish(reg, begin(reg, "t2"), b"task-2")
        assert [t.name for t in reg.list_tasks("b")] == ["t1", "t2"]
    with Registry(home, db_url, create=False) as reg:  # and is the recorded store from now on
        assert Path(reg.store.root) == real
        assert reg.check_artifact(reg.get_task("t2").artifact) == b"task-2"


def test_deleted_row_fails_report_verify_and_the_real_store_heals_it(capsys, tmp_path):
    home, other = tmp_path / "home", tmp_path / "other"
    shutil.copytree(FIXTURE, home)
    verify = ("--home", str(home), "--json", "report", "accuracy", "--verify", "--base", "tiny",
              "--task", "lin", "--workers", "1")
    code, out, err = run(capsys, *verify)
    assert code == 0 and json.loads(out)["verified"] is True, err
    with Registry(home, create=False) as reg:
        delete_store_row(reg)
    code, out, err = run(capsys, *verify)
    report = json.loads(out)
    assert code == 1 and report["verified"] is False, err
    assert "artifact store" in json.dumps(report) and "row is missing" in json.dumps(report)
    # A write naming another store fails in one line and records nothing there or here.
    other.mkdir()
    code, out, err = run(capsys, "--home", str(home), "--artifacts", str(other), "base", "add",
                         "b2", "--model", "timm:test_resnet")
    assert code == 1 and out == ""
    assert_one_line_error(err, "records no artifact store, and .* does not hold its files")
    assert files_under(other) == {}
    with Registry(home, create=False) as reg:
        assert store_rows(reg) == [] and [b.name for b in reg.list_bases()] == ["tiny"]
    # The home's own store records itself again with the next write, and verifies.
    code, _, err = run(capsys, "--home", str(home), "base", "add", "b2", "--model",
                       "timm:test_resnet")
    assert code == 0, err
    with Registry(home, create=False) as reg:
        assert store_rows(reg) == [("artifacts", None)]
    code, out, err = run(capsys, *verify)
    assert code == 0 and json.loads(out)["verified"] is True, err


def test_verify_names_a_record_that_is_not_the_store_in_use(tmp_path):
    # A store without a marker is known by its directory: a row naming another one is wrong.
    with Registry(tmp_path / "home") as reg:
        add_base(reg)
        reg.check_store_binding()
        (tmp_path / "moved").mkdir()
        with reg.engine.begin() as conn:  # edited while this client has the store open
            conn.execute(text("UPDATE artifact_store SET url = :u"),
                         {"u": str(tmp_path / "moved")})
        with pytest.raises(StoreMismatch, match="is not this registry's store"):
            reg.check_store_binding()
    # A named store is known by the id in its marker: a row with another id is wrong.
    with Registry(tmp_path / "home2", artifacts=str(tmp_path / "store")) as reg:
        add_base(reg)
        reg.check_store_binding()
        with reg.engine.begin() as conn:
            conn.execute(text("UPDATE artifact_store SET store_id = 'f00'"))
        with pytest.raises(StoreMismatch, match="is not this registry's store"):
            reg.check_store_binding()


def test_verify_names_a_default_store_another_registry_has_marked(tmp_path):
    with Registry(tmp_path / "home") as reg:
        add_base(reg)
        reg.check_store_binding()
        (reg.store.root / MARKER).write_text(json.dumps(
            {"format": "taps-cl artifact store", "store_id": "0123abcd"}))
        with pytest.raises(StoreMismatch, match="0123abcd"):
            reg.check_store_binding()


# ------------------------------------------------------------------ a failed write records nothing
def test_failed_first_write_records_no_store(tmp_path, db_url):
    home, first, second = tmp_path / "home", tmp_path / "first", tmp_path / "second"
    with Registry(home, db_url, artifacts=str(first)) as reg:
        assert reg.store_record is None  # nothing recorded before the first artifact
        _refuse_inserts(reg, "base_models", "disk says no")
        with pytest.raises(RegistryError, match="disk says no"):
            add_base(reg, weights=b"w" * 1000)
        assert store_rows(reg) == [] and reg.store_record is None
        assert files_under(first) == {}  # neither the weights nor a marker stayed
        with reg.engine.begin() as conn:
            conn.execute(text("DROP TRIGGER ro" + ("" if reg.engine.name == "sqlite"
                                                   else " ON base_models")))
    # The next write may name another store: the failed one claimed nothing.
    with Registry(home, db_url, artifacts=str(second)) as reg:
        base = add_base(reg)
        assert reg.store_record is not None and reg.store_record.url == str(second)
        assert reg.store_record.store_id == marker_id(second)
        assert store_rows(reg) == [(str(second), marker_id(second))]
        assert reg.check_artifact(base.weights) == b"weights-1"
        reg.check_store_binding()
    assert files_under(first) == {}
    (tmp_path / "third").mkdir()
    with pytest.raises(StoreMismatch, match="is not this registry's store"):
        Registry(home, db_url, artifacts=str(tmp_path / "third"))


def test_command_that_fails_before_writing_records_no_store(capsys, tmp_path):
    home, first, second = tmp_path / "home", tmp_path / "first", tmp_path / "second"
    code, _, err = run(capsys, "--home", str(home), "--artifacts", str(first), "base", "add",
                       "b", "--model", "timm:no_such_model_anywhere")
    assert code == 1
    assert_one_line_error(err, "unknown timm model")
    code, _, err = run(capsys, "--home", str(home), "--artifacts", str(second), "base", "add",
                       "b", "--model", "timm:test_resnet")
    assert code == 0, err
    code, out, err = run(capsys, "--home", str(home), "--json", "db", "current")
    assert code == 0 and json.loads(out)["artifacts"] == str(second), err
    assert files_under(first) == {}


def test_concurrent_first_writers_record_one_store(tmp_path):
    """Two clients of a new registry name different stores: the first artifact committed
    records its store; the other client's write is refused and leaves nothing in its store."""
    home, one, two = tmp_path / "home", tmp_path / "one", tmp_path / "two"
    with Registry(home, artifacts=str(one)) as a, Registry(home, artifacts=str(two)) as b:
        add_base(a, "b1")
        with pytest.raises(StoreMismatch, match=rf"{two} is not this registry's store"):
            add_base(b, "b2", weights=b"weights-2")
        assert b.store_record is None and files_under(two) == {}
        assert [x.name for x in a.list_bases()] == ["b1"]
        assert store_rows(a) == [(str(one), marker_id(one))]


def test_reader_that_writes_records_the_store_it_checked(tmp_path):
    """A client opened for reading that writes (Manager reuses it) records the store too."""
    home = tmp_path / "home"
    Registry(home).close()  # a schema, nothing recorded
    with Registry(home, create=False, artifacts=str(tmp_path / "store")) as reg:
        add_base(reg)
        assert store_rows(reg) == [(str(tmp_path / "store"), marker_id(tmp_path / "store"))]
    with pytest.raises((StoreMismatch, StoreError)):
        Registry(home, create=False, artifacts=str(tmp_path / "elsewhere"))
