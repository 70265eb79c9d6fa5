"""Local and S3 storage: round trips, multipart transfers, and storage errors as one line.

S3 is moto's standalone server over HTTP. Access denied and bad credentials are real: the fixture `iam_enforced`
switches on the server's IAM checks (its /moto-api/reset-auth endpoint), so requests are signed and checked
against IAM users and policies created through the server's IAM API.
"""

from __future__ import annotations

import os
from pathlib import Path

import boto3
import pytest

from agnews.config import PROJECT_ROOT, compose
from agnews.errors import NotFoundError, StorageError
from agnews.storage import MB, LocalStorage, Storage, open_storage
from tests.helpers import free_port, use_credentials


def round_trip(storage: Storage) -> None:
    """Every Storage operation against one store."""
    assert not storage.exists("a/b.txt")
    assert storage.size("a/b.txt") is None
    with pytest.raises(NotFoundError):
        storage.read_bytes("a/b.txt")
    storage.write_bytes("a/b.txt", b"hello")
    assert (storage.exists("a/b.txt"), storage.size("a/b.txt"), storage.read_bytes("a/b.txt")) == (True, 5, b"hello")
    storage.write_bytes("a/b.txt", b"replaced")
    assert storage.read_bytes("a/b.txt") == b"replaced"
    data = bytes(range(256)) * 10
    storage.write_bytes("a/c/file.bin", data)
    storage.copy("a/c/file.bin", "z/copy.bin")
    assert storage.read_bytes("z/copy.bin") == data
    assert storage.list("a") == ["a/b.txt", "a/c/file.bin"]
    assert storage.list("") == ["a/b.txt", "a/c/file.bin", "z/copy.bin"]
    assert storage.list("nothing") == []
    storage.delete("a/c/file.bin")
    storage.delete("a/never-written")
    assert storage.list("") == ["a/b.txt", "z/copy.bin"]
    with pytest.raises(NotFoundError):
        storage.copy("a/c/file.bin", "z/gone.bin")


def conditional_writes(storage: Storage) -> None:
    """create, read_token, swap and delete_if against one store: each writes only while its condition holds."""
    assert storage.read_token("a/lock") is None
    first = storage.create("a/lock", b"first")
    assert first is not None
    assert storage.create("a/lock", b"second") is None, "create never replaces"
    assert storage.read_token("a/lock") == (b"first", first)
    second = storage.swap("a/lock", b"second", first)
    assert second is not None and second != first
    assert storage.swap("a/lock", b"third", first) is None, "a stale token swaps nothing"
    assert storage.delete_if("a/lock", first) is False
    assert storage.read_token("a/lock") == (b"second", second)
    assert storage.delete_if("a/lock", second) is True
    assert storage.read_token("a/lock") is None
    assert storage.swap("a/lock", b"x", second) is None and storage.delete_if("a/lock", second) is False
    assert storage.list("a") == ["a/b.txt"]


def test_local_round_trip(tmp_path: Path, make_cfg) -> None:
    storage = open_storage(make_cfg().storage)
    assert isinstance(storage, LocalStorage)
    round_trip(storage)
    conditional_writes(storage)
    root = tmp_path / "store"
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*")) == ["a", "a/b.txt", "z", "z/copy.bin"]
    assert storage.url("a/b.txt") == (root / "a" / "b.txt").as_uri()


def test_local_uri_forms(tmp_path: Path, make_cfg) -> None:
    assert open_storage(make_cfg(f"storage.uri=file://{tmp_path}/x").storage).root == tmp_path / "x"
    assert open_storage(make_cfg(f"storage.uri={tmp_path}/y").storage).root == tmp_path / "y"
    with pytest.raises(StorageError, match=r"unsupported scheme 'gs'"):
        open_storage(make_cfg("storage.uri=gs://bucket").storage)
    with pytest.raises(StorageError, match=r"names no bucket"):
        open_storage(make_cfg("storage.uri=s3:///path").storage)


def test_default_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default store is the git-ignored .store folder; the seed's S3_BUCKET switches it to S3."""
    monkeypatch.delenv("S3_BUCKET", raising=False)
    assert compose().storage.uri == str(PROJECT_ROOT / ".store")
    monkeypatch.setenv("S3_BUCKET", "some-bucket")
    assert compose().storage.uri == "s3://some-bucket"


def test_local_write_error_is_one_line(tmp_path: Path, make_cfg) -> None:
    (tmp_path / "file").write_text("not a folder")
    storage = open_storage(make_cfg(f"storage.uri={tmp_path / 'file'}").storage)
    with pytest.raises(StorageError, match=rf"^cannot write {tmp_path}/file/k: [^\n]+$"):
        storage.write_bytes("k", b"x")


def test_s3_round_trip(s3_env: str, bucket: str, tmp_path: Path, make_cfg) -> None:
    storage = open_storage(make_cfg(f"storage.uri=s3://{bucket}/some/prefix").storage)
    round_trip(storage)
    conditional_writes(storage)
    listed = boto3.client("s3", endpoint_url=s3_env).list_objects_v2(Bucket=bucket)["Contents"]
    assert sorted(obj["Key"] for obj in listed) == ["some/prefix/a/b.txt", "some/prefix/z/copy.bin"]
    assert storage.url("a/b.txt") == f"s3://{bucket}/some/prefix/a/b.txt"


def test_s3_multipart(s3_env: str, bucket: str, tmp_path: Path, make_cfg) -> None:
    """Above the threshold the writes and copies go in parts: the ETag carries the part count."""
    storage = open_storage(
        make_cfg(
            f"storage.uri=s3://{bucket}", "storage.multipart_threshold_mb=5", "storage.multipart_chunksize_mb=5"
        ).storage
    )
    big = os.urandom(11 * MB)
    storage.write_bytes("big.bin", big)
    storage.copy("big.bin", "copy.bin")
    client = boto3.client("s3", endpoint_url=s3_env)
    for key in ("big.bin", "copy.bin"):
        assert client.head_object(Bucket=bucket, Key=key)["ETag"].strip('"').endswith("-3"), key
    assert storage.read_bytes("copy.bin") == big
    storage.write_bytes("small.bin", b"x")
    assert "-" not in client.head_object(Bucket=bucket, Key="small.bin")["ETag"]


def one_line_error(storage: Storage, action: str) -> str:
    with pytest.raises(StorageError) as caught:
        if action == "read":
            storage.read_bytes("k")
        else:
            storage.write_bytes("k", b"x")
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_s3_no_bucket(s3_env: str, make_cfg) -> None:
    storage = open_storage(make_cfg("storage.uri=s3://agnews-no-such-bucket").storage)
    for action in ("read", "write"):
        message = one_line_error(storage, action)
        assert message == f"cannot {action} s3://agnews-no-such-bucket/k: bucket 'agnews-no-such-bucket' does not exist"


def test_s3_endpoint_down(s3_env: str, make_cfg, monkeypatch: pytest.MonkeyPatch) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("S3_ENDPOINT_URL", closed)
    message = one_line_error(open_storage(make_cfg("storage.uri=s3://agnews-any").storage), "read")
    assert message.startswith("cannot read s3://agnews-any/k: S3 endpoint unreachable (Could not connect")
    assert closed in message


def test_s3_no_credentials(bucket: str, make_cfg, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in (
        "AWS_PROFILE",
        "AWS_SESSION_TOKEN",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    use_credentials(monkeypatch, None, None)
    message = one_line_error(open_storage(make_cfg(f"storage.uri=s3://{bucket}").storage), "read")
    assert message.startswith(f"cannot read s3://{bucket}/k: no AWS credentials")


def test_s3_access_denied_and_bad_credentials(
    bucket: str, iam_enforced, make_cfg, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = make_cfg(f"storage.uri=s3://{bucket}/data")
    use_credentials(monkeypatch, *iam_enforced["writer"])
    open_storage(cfg.storage).write_bytes("k", b"written by the writer")

    use_credentials(monkeypatch, *iam_enforced["reader"])
    reader = open_storage(cfg.storage)
    assert reader.read_bytes("k") == b"written by the writer"
    assert one_line_error(reader, "write") == f"cannot write s3://{bucket}/data/k: access denied"

    use_credentials(monkeypatch, "AKIAUNKNOWNKEY000000", "secret")
    message = one_line_error(open_storage(cfg.storage), "read")
    assert message == f"cannot read s3://{bucket}/data/k: bad AWS credentials (InvalidAccessKeyId)"

    use_credentials(monkeypatch, iam_enforced["reader"][0], "wrong-secret")
    message = one_line_error(open_storage(cfg.storage), "read")
    assert message == f"cannot read s3://{bucket}/data/k: bad AWS credentials (SignatureDoesNotMatch)"
