"""The artifact store on S3, through s3fs, against moto's S3 server started here on 127.0.0.1.

s3fs is configured the way a user configures it: environment variables (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION). Without s3fs or moto the tests
skip, except under TAPS_CL_REQUIRE_SERVERS=1 (CI), where they fail (tests/servers.py).
"""

from __future__ import annotations

import json
import logging
import socket
import uuid
from collections.abc import Iterator

import pytest
import torch
from safetensors.torch import load_file

from registry import IntegrityFailure, Registry, StoreError
from registry.store import MARKER, TEMP_PREFIX, ArtifactStore
from tests.servers import require_or_skip
from tests.test_artifact_store_url import add_and_restore
from tests.test_cli import assert_one_line_error, run
from tests.test_registry import add_base, begin, finish


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """moto's standalone S3 server on a free loopback port, for this module; stopped after."""
    try:
        import s3fs  # noqa: F401
        from moto.server import ThreadedMotoServer
    except ImportError as exc:
        require_or_skip(f"S3 tests need s3fs and moto[server] (pip install 'taps-cl[test]'): {exc}")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def configure_s3(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    """Point s3fs (botocore) at ``endpoint`` with dummy credentials, as a user would."""
    import s3fs

    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # never ask for instance credentials
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # an unreachable endpoint fails at once
    s3fs.S3FileSystem.clear_instance_cache()  # instances are cached with their old settings


@pytest.fixture()
def s3_bucket(monkeypatch: pytest.MonkeyPatch, s3_endpoint: str) -> Iterator[str]:
    """A new bucket on the server; the URL of a prefix in it."""
    import s3fs

    configure_s3(monkeypatch, s3_endpoint)
    bucket = f"taps-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem().mkdir(bucket)
    yield f"s3://{bucket}/team/store"
    s3fs.S3FileSystem.clear_instance_cache()


def test_s3_store_writes_atomically_and_checks_every_read(s3_bucket):
    import s3fs

    fs = s3fs.S3FileSystem()
    prefix = s3_bucket.removeprefix("s3://")
    store = ArtifactStore(s3_bucket)
    assert not store.is_local
    digest, relative = store.write(b"content")
    assert store.read(relative, digest) == b"content"
    assert store.put(b"content") == (digest, relative, False)  # stored once, never rewritten
    assert not [p for p in fs.find(prefix) if TEMP_PREFIX in p]  # the temp object was moved
    assert [(rel, size) for rel, size, _ in store.files()] == [(relative, 7)]
    fs.pipe_file(f"{prefix}/{relative}", b"damaged")
    with pytest.raises(IntegrityFailure, match="is corrupt"):
        store.read(relative, digest)
    with pytest.raises(IntegrityFailure, match="exists but is corrupt"):
        store.write(b"content")
    assert fs.cat_file(f"{prefix}/{relative}") == b"damaged"
    with pytest.raises(IntegrityFailure, match="escapes the store"):
        store.path_of("../other/x.safetensors")
    assert store.remove(relative) == len(b"damaged") and store.remove(relative) == 0
    with pytest.raises(IntegrityFailure, match="missing"):
        store.read(relative, digest)


def test_s3_task_added_from_home_a_restores_bit_identically_from_home_b(
        capsys, tmp_path, image_data, s3_bucket):
    """A task added from one machine (home A) restores bit-identically from another (home B)
    sharing the database URL and an S3 artifact store; verify and gc work from home B."""
    import s3fs

    database = f"sqlite:///{tmp_path / 'shared' / 'registry.db'}"
    a = ["--home", str(tmp_path / "a"), "--db", database, "--artifacts", s3_bucket]
    add_and_restore(capsys, a, image_data, tmp_path / "a.safetensors")
    fs = s3fs.S3FileSystem()
    prefix = s3_bucket.removeprefix("s3://")
    assert json.loads(fs.cat_file(f"{prefix}/{MARKER}"))["store_id"]
    assert not (tmp_path / "a" / "artifacts").exists()

    b = ["--home", str(tmp_path / "b"), "--db", database]  # the store comes from the record
    code, _, err = run(capsys, *b, "restore", "t", "--out", str(tmp_path / "b.safetensors"))
    assert code == 0, err
    ours, theirs = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors")
    assert ours.keys() == theirs.keys() and ours
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)

    code, out, err = run(capsys, *b, "--json", "report", "accuracy", "--verify")
    assert code == 0, err
    assert json.loads(out)["verified"] is True
    # gc from home B lists and removes only an unreferenced object.
    fs.pipe_file(f"{prefix}/ab/ab{'0' * 62}.safetensors", b"orphan")
    fs.invalidate_cache()
    before = {p: fs.cat_file(p) for p in fs.find(prefix) if p.endswith(".safetensors")}
    code, out, err = run(capsys, *b, "--json", "gc")
    assert code == 0, err
    assert [(f["path"], f["reason"]) for f in json.loads(out)["files"]] == [
        (f"ab/ab{'0' * 62}.safetensors", "unreferenced")]
    code, out, err = run(capsys, *b, "gc", "--yes")
    assert code == 0 and "removed 1 file(s)" in out, err
    fs.invalidate_cache()
    after = {p: fs.cat_file(p) for p in fs.find(prefix) if p.endswith(".safetensors")}
    assert after == {p: v for p, v in before.items() if "/ab/ab000" not in p}
    assert fs.exists(f"{prefix}/{MARKER}")
    code, out, err = run(capsys, *b, "--json", "report", "accuracy", "--verify")
    assert code == 0 and json.loads(out)["verified"] is True, err


def test_s3_other_bucket_is_refused_and_unreachable_endpoint_is_one_line(
        capsys, tmp_path, s3_bucket, s3_endpoint, monkeypatch):
    import s3fs

    with Registry(tmp_path / "home", artifacts=s3_bucket) as reg:
        add_base(reg)
        finish(reg, begin(reg, "t1"))
    other = f"s3://taps-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem().mkdir(other.removeprefix("s3://"))
    home = ["--home", str(tmp_path / "home")]
    code, out, err = run(capsys, *home, "--artifacts", other, "base", "list")
    assert code == 1 and out == ""
    assert_one_line_error(err, rf"artifact store {other} is not this registry's store "
                               rf"\(recorded: {s3_bucket}\)")
    assert s3fs.S3FileSystem().find(other.removeprefix("s3://")) == []  # nothing written
    code, _, err = run(capsys, *home, "task", "list")
    assert code == 0, err

    with socket.socket() as sock:  # a loopback port nothing listens on
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    configure_s3(monkeypatch, f"http://127.0.0.1:{closed}")
    code, out, err = run(capsys, *home, "task", "list")
    assert code == 1 and out == ""
    assert_one_line_error(err, rf"artifact store {s3_bucket} is unreachable")
    configure_s3(monkeypatch, s3_endpoint)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    code, out, err = run(capsys, *home, "task", "list")
    assert code == 1 and out == ""
    assert_one_line_error(err, rf"artifact store {s3_bucket} is unreachable: .*credentials")


def test_s3_missing_bucket_is_one_line_and_leaves_no_record(capsys, tmp_path, s3_bucket):
    missing = f"s3://taps-missing-{uuid.uuid4().hex[:8]}/store"
    code, out, err = run(capsys, "--home", str(tmp_path / "home"), "--artifacts", missing,
                         "base", "add", "b", "--model", "timm:test_resnet")
    assert code == 1 and out == ""
    assert_one_line_error(err, "bucket does not exist")
    with pytest.raises(StoreError):
        ArtifactStore(missing).write(b"x")
