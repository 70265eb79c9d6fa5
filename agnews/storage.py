"""One key layout over two backends: S3 (or any S3-compatible endpoint) and a local folder.

Besides plain reads and writes, both offer conditional writes on small objects, for locks and append-only records:
``create`` writes only a key that does not exist, ``swap`` replaces an object only while it still holds the bytes a
token names (compare-and-swap), ``delete_if`` deletes it only then. In S3 these are conditional requests
(``If-None-Match: *``, ``If-Match: <ETag>``), which S3 evaluates atomically with the write. In a folder, ``create``
links a complete temporary file into place (which fails if the name exists, as ``O_EXCL`` does), and ``swap`` and
``delete_if`` compare and write under an exclusive ``flock`` of the object's folder.
"""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import hashlib
import io
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol, TypeVar
from urllib.parse import urlparse

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config as BotoConfig
from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError

from agnews.errors import NotFoundError, StorageError
from agnews.settings import StorageSettings

MB = 1024 * 1024
FOLDER_TRIES = 5  # a local write whose folder a concurrent prune removes makes it again, this many times at most
T = TypeVar("T")
# S3's answers to a conditional request that lost: the condition failed, the key is gone, or another conditional
# write on the key was in flight.
LOST_CONDITION = {"PreconditionFailed", "412", "NoSuchKey", "404", "ConditionalRequestConflict", "409"}
_UMASK = os.umask(0)
os.umask(_UMASK)


class Storage(Protocol):
    """What the steps need from a store; keys are '/'-separated paths below the store's root."""

    uri: str

    def url(self, key: str) -> str: ...
    def exists(self, key: str) -> bool: ...
    def size(self, key: str) -> int | None: ...
    def read_bytes(self, key: str) -> bytes: ...
    def write_bytes(self, key: str, data: bytes) -> None: ...
    def copy(self, src: str, dst: str) -> None: ...
    def delete(self, key: str) -> None: ...
    def list(self, prefix: str) -> list[str]: ...
    def create(self, key: str, data: bytes) -> str | None:
        """Write ``data`` if ``key`` does not exist; the token of what was written, or None when the key exists."""
        ...

    def read_token(self, key: str) -> tuple[bytes, str] | None:
        """The object's bytes and their token; None when it does not exist."""
        ...

    def swap(self, key: str, data: bytes, token: str) -> str | None:
        """Write ``data`` if the object still holds what ``token`` names; the new token, or None when it does not."""
        ...

    def delete_if(self, key: str, token: str) -> bool:
        """Delete the object if it still holds what ``token`` names; False when it does not."""
        ...


class LocalStorage:
    """A folder; every write lands in a temporary file first and is renamed into place."""

    def __init__(self, root: Path) -> None:
        self.root = root.expanduser().resolve()
        self.uri = str(self.root)

    def _path(self, key: str) -> Path:
        return self.root / key

    def url(self, key: str) -> str:
        return self._path(key).as_uri()

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int | None:
        path = self._path(key)
        return path.stat().st_size if path.is_file() else None

    def read_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise NotFoundError(f"no such file: {self._path(key)}") from None

    @contextlib.contextmanager
    def _atomic(self, key: str, place: Callable[[str, Path], None] = os.replace) -> Iterator[Path]:
        """A temporary file beside the key's, which ``place`` puts at the key once the block has filled it;
        ``os.link`` raises FileExistsError where the key exists."""
        target = self._path(key)
        try:
            fd, tmp = self._folder(target, lambda folder: tempfile.mkstemp(dir=folder, prefix=f".{target.name}."))
            os.close(fd)
        except OSError as exc:
            raise StorageError(f"cannot write {target}: {exc.strerror}") from None
        try:
            yield Path(tmp)
            os.chmod(tmp, 0o666 & ~_UMASK)
            place(tmp, target)
        except FileExistsError:
            raise
        except OSError as exc:
            raise StorageError(f"cannot write {target}: {exc.strerror}") from None
        finally:
            Path(tmp).unlink(missing_ok=True)

    def write_bytes(self, key: str, data: bytes) -> None:
        with self._atomic(key) as tmp:
            tmp.write_bytes(data)

    def copy(self, src: str, dst: str) -> None:
        if not self.exists(src):
            raise NotFoundError(f"no such file: {self._path(src)}")
        with self._atomic(dst) as tmp:
            shutil.copyfile(self._path(src), tmp)

    def delete(self, key: str) -> None:
        """Remove a file, and any folders that this leaves empty below the root."""
        path = self._path(key)
        path.unlink(missing_ok=True)
        self._prune(path)

    def _prune(self, path: Path) -> None:
        """Remove the folders above ``path`` that are empty, up to the root. A writer that makes one of them again at
        the same moment retries (``_folder``), and one that has filled it keeps it (rmdir refuses)."""
        for parent in path.parents:
            if parent == self.root:
                break
            try:
                parent.rmdir()
            except OSError:  # not empty, or gone already
                break

    @staticmethod
    def _folder(path: Path, use: Callable[[Path], T]) -> T:
        """``use(folder)`` on ``path``'s folder, made first, and made again if a prune removed it in between."""
        for _ in range(FOLDER_TRIES - 1):
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                return use(path.parent)
            except FileNotFoundError:
                continue
        path.parent.mkdir(parents=True, exist_ok=True)
        return use(path.parent)

    def list(self, prefix: str) -> list[str]:
        base = self._path(prefix)
        if not base.is_dir():
            return []
        return sorted(p.relative_to(self.root).as_posix() for p in base.rglob("*") if p.is_file())

    @staticmethod
    def _token(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    @contextlib.contextmanager
    def _folder_locked(self, key: str) -> Iterator[None]:
        """An exclusive flock of the key's folder, held by every compare-and-swap in it."""
        folder = self._path(key).parent
        try:
            fd = self._folder(self._path(key), lambda folder: os.open(folder, os.O_RDONLY))
        except OSError as exc:
            raise StorageError(f"cannot lock {folder}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing drops the flock

    def create(self, key: str, data: bytes) -> str | None:
        try:
            with self._atomic(key, place=os.link) as tmp:  # a complete file, or none at all
                tmp.write_bytes(data)
        except FileExistsError:
            return None
        return self._token(data)

    def read_token(self, key: str) -> tuple[bytes, str] | None:
        try:
            data = self.read_bytes(key)
        except NotFoundError:
            return None
        return data, self._token(data)

    def swap(self, key: str, data: bytes, token: str) -> str | None:
        with self._folder_locked(key):
            found = self.read_token(key)
            if found is None or found[1] != token:
                return None
            self.write_bytes(key, data)
        return self._token(data)

    def delete_if(self, key: str, token: str) -> bool:
        with self._folder_locked(key):
            found = self.read_token(key)
            if found is None or found[1] != token:
                return False
            self._path(key).unlink()
        # The folder goes once it is empty (a failed first register leaves no models/<name>/ behind). A contender
        # waiting for its flock then holds a removed folder, where every compare-and-swap finds no key and fails.
        self._prune(self._path(key))
        return True


class S3Storage:
    """A bucket and optional prefix; writes and copies go through boto3's transfer manager (multipart above
    ``storage.multipart_threshold_mb``, ``storage.max_concurrency`` parts at once)."""

    def __init__(self, bucket: str, prefix: str, transfer: TransferConfig, client_config: BotoConfig) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.uri = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self.transfer = transfer
        self.client = s3_client(client_config)

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    @contextlib.contextmanager
    def _errors(self, action: str, key: str = "") -> Iterator[None]:
        where = self.url(key) if key else f"s3://{self.bucket}"
        try:
            yield
        except ClientError as exc:
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            if code in ("NoSuchKey", "404", "NotFound"):
                raise NotFoundError(f"no such object: {where}") from None
            if code == "NoSuchBucket":
                raise StorageError(f"cannot {action} {where}: bucket '{self.bucket}' does not exist") from None
            if code in ("AccessDenied", "403", "Forbidden"):
                raise StorageError(f"cannot {action} {where}: access denied") from None
            if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"):
                raise StorageError(f"cannot {action} {where}: bad AWS credentials ({code})") from None
            raise StorageError(f"cannot {action} {where}: {code} {err.get('Message', '')}".strip()) from None
        except NoCredentialsError:
            raise StorageError(
                f"cannot {action} {where}: no AWS credentials (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
                "or AWS_PROFILE)"
            ) from None
        except EndpointConnectionError as exc:
            raise StorageError(f"cannot {action} {where}: S3 endpoint unreachable ({exc})") from None
        except BotoCoreError as exc:
            raise StorageError(f"cannot {action} {where}: {exc}") from None

    def exists(self, key: str) -> bool:
        return self.size(key) is not None

    def size(self, key: str) -> int | None:
        try:
            with self._errors("read", key):
                return self.client.head_object(Bucket=self.bucket, Key=self._key(key))["ContentLength"]
        except NotFoundError:
            return None

    def read_bytes(self, key: str) -> bytes:
        # One GET, whose error names a missing bucket (the transfer manager's HEAD would say only 404).
        with self._errors("read", key):
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()

    def write_bytes(self, key: str, data: bytes) -> None:
        with self._errors("write", key):
            self.client.upload_fileobj(io.BytesIO(data), self.bucket, self._key(key), Config=self.transfer)

    def copy(self, src: str, dst: str) -> None:
        with self._errors("write", dst):
            self.client.copy(
                {"Bucket": self.bucket, "Key": self._key(src)}, self.bucket, self._key(dst), Config=self.transfer
            )

    def delete(self, key: str) -> None:
        with self._errors("delete", key):
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def list(self, prefix: str) -> list[str]:
        keys: list[str] = []
        start = len(self._key(""))
        with self._errors("list", prefix):
            for page in self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self._key(prefix)
            ):
                keys.extend(obj["Key"][start:] for obj in page.get("Contents", []))
        return sorted(keys)

    @contextlib.contextmanager
    def _conditional(self, action: str, key: str) -> Iterator[builtins.list[bool]]:  # `list` is a method here
        """Errors as ``_errors`` does, but a conditional request that lost sets ``lost[0]`` instead."""
        lost = [False]
        with self._errors(action, key):
            try:
                yield lost
            except ClientError as exc:
                if str(exc.response.get("Error", {}).get("Code", "")) not in LOST_CONDITION:
                    raise
                lost[0] = True

    def create(self, key: str, data: bytes) -> str | None:
        with self._conditional("write", key) as lost:
            put = self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, IfNoneMatch="*")
        return None if lost[0] else put["ETag"]

    def read_token(self, key: str) -> tuple[bytes, str] | None:
        with self._conditional("read", key) as lost:
            got = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            data = got["Body"].read()
        return None if lost[0] else (data, got["ETag"])

    def swap(self, key: str, data: bytes, token: str) -> str | None:
        with self._conditional("write", key) as lost:
            put = self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, IfMatch=token)
        return None if lost[0] else put["ETag"]

    def delete_if(self, key: str, token: str) -> bool:
        with self._conditional("delete", key) as lost:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key), IfMatch=token)
        return not lost[0]


def s3_client(config: BotoConfig | None = None):
    """An S3 client from the standard credential chain, honouring AWS_REGION and S3_ENDPOINT_URL."""
    return boto3.client(
        "s3",
        endpoint_url=os.environ.get("S3_ENDPOINT_URL") or None,
        region_name=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"),
        config=config,
    )


def open_storage(storage: StorageSettings) -> Storage:
    """The store that ``storage`` (a config's ``storage`` group) names by ``uri``: ``s3://bucket/prefix``,
    ``file:///path`` or a folder."""
    uri = str(storage.uri)
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise StorageError(f"storage.uri {uri!r} names no bucket")
        transfer = TransferConfig(
            multipart_threshold=storage.multipart_threshold_mb * MB,
            multipart_chunksize=storage.multipart_chunksize_mb * MB,
            max_concurrency=storage.max_concurrency,
        )
        client_config = BotoConfig(
            connect_timeout=storage.connect_timeout_s,
            retries={"max_attempts": storage.max_attempts, "mode": "standard"},
        )
        return S3Storage(parsed.netloc, parsed.path, transfer, client_config)
    if parsed.scheme == "file":
        return LocalStorage(Path(parsed.path))
    if parsed.scheme:
        raise StorageError(f"storage.uri {uri!r}: unsupported scheme '{parsed.scheme}' (use s3://, file:// or a path)")
    return LocalStorage(Path(uri))
