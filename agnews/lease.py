"""A lease lock in storage: one holder at a time per key, across processes and machines that share the store.

In S3 the lock is an object created with a conditional PUT (``If-None-Match: *``) and renewed, taken over and
released with ``If-Match`` on its ETag, so two contenders can never both believe they hold it. In a local folder it
is a file created with ``O_CREAT | O_EXCL``; renewals, take-overs and releases compare and swap under a ``flock`` of
the folder, held for the length of one compare-and-swap.

The record names its owner and when it expires (UTC wall-clock time, so the clocks of the hosts that share a
store must agree to well within a lease's duration, as NTP keeps them). The holder renews it from a background
thread every third of its duration. A holder that died stops renewing; once its record has expired, the next
contender takes the lock over with the same conditional write, so only one of them does. Contenders poll with
capped exponential backoff. ``Lease.check()`` raises when the lease was lost (a renewal found another owner, or the
lease ran out), so that a holder stops before its next write instead of racing the new holder.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from botocore.exceptions import ClientError

from agnews.errors import StorageError
from agnews.storage import LocalStorage, S3Storage, Storage

LEASE_SECONDS = 60.0  # a holder renews every third of this; a dead holder blocks others this long at most
WAIT_SECONDS = 900.0  # how long a contender waits for the lock before giving up
POLL_SECONDS = (0.05, 2.0)  # the first and the longest pause between two tries
# S3's answers to a conditional write that lost: the condition failed, the key is gone, or another conditional
# write on the key was in flight.
LOST_WRITE = {"PreconditionFailed", "412", "NoSuchKey", "404", "ConditionalRequestConflict", "409"}

log = logging.getLogger(__name__)


class LeaseError(StorageError):
    """The lock could not be had in time, or a holder lost it."""


class LockObject(Protocol):
    """Compare-and-swap on one small object; a token identifies one written state of it."""

    url: str

    def create(self, data: bytes) -> str | None:
        """Write ``data`` if the object does not exist; its token, or None when it exists."""

    def read(self) -> tuple[bytes, str] | None:
        """The object's bytes and token; None when it does not exist."""

    def replace(self, data: bytes, token: str) -> str | None:
        """Write ``data`` if the object is still at ``token``; the new token, or None when it is not."""

    def delete(self, token: str) -> bool:
        """Delete the object if it is still at ``token``; False when it is not."""


class S3Lock:
    """The lock as an S3 object, written with conditional PUTs and deleted with a conditional DELETE."""

    def __init__(self, storage: S3Storage, key: str) -> None:
        self.storage, self.key = storage, key
        self.bucket, self.object_key = storage.bucket, f"{storage.prefix}/{key}" if storage.prefix else key
        self.url = storage.url(key)

    @contextlib.contextmanager
    def _lost_is_none(self, action: str) -> Iterator[list[bool]]:
        """Report a lost conditional write by setting ``lost[0]``; every other failure is a StorageError."""
        lost = [False]
        with self.storage._errors(action, self.key):
            try:
                yield lost
            except ClientError as exc:
                if str(exc.response.get("Error", {}).get("Code", "")) not in LOST_WRITE:
                    raise
                lost[0] = True

    def create(self, data: bytes) -> str | None:
        with self._lost_is_none("write") as lost:
            put = self.storage.client.put_object(Bucket=self.bucket, Key=self.object_key, Body=data, IfNoneMatch="*")
        return None if lost[0] else put["ETag"]

    def read(self) -> tuple[bytes, str] | None:
        with self._lost_is_none("read") as lost:
            got = self.storage.client.get_object(Bucket=self.bucket, Key=self.object_key)
            data = got["Body"].read()
        return None if lost[0] else (data, got["ETag"])

    def replace(self, data: bytes, token: str) -> str | None:
        with self._lost_is_none("write") as lost:
            put = self.storage.client.put_object(Bucket=self.bucket, Key=self.object_key, Body=data, IfMatch=token)
        return None if lost[0] else put["ETag"]

    def delete(self, token: str) -> bool:
        with self._lost_is_none("delete") as lost:
            self.storage.client.delete_object(Bucket=self.bucket, Key=self.object_key, IfMatch=token)
        return not lost[0]


class FileLock:
    """The lock as a file, created with O_EXCL; every compare-and-swap holds a flock of its folder."""

    def __init__(self, storage: LocalStorage, key: str) -> None:
        self.path = storage.root / key
        self.url = self.path.as_uri()

    @staticmethod
    def _token(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    @contextlib.contextmanager
    def _folder_locked(self) -> Iterator[None]:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path.parent, os.O_RDONLY)
        except OSError as exc:
            raise StorageError(f"cannot lock {self.url}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing drops the flock

    def _read(self) -> tuple[bytes, str] | None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        return data, self._token(data)

    def _write(self, data: bytes, flags: int) -> str:
        fd = os.open(self.path, flags | os.O_WRONLY, 0o644)
        with os.fdopen(fd, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        return self._token(data)

    def create(self, data: bytes) -> str | None:
        with self._folder_locked():
            try:
                return self._write(data, os.O_CREAT | os.O_EXCL)
            except FileExistsError:
                return None

    def read(self) -> tuple[bytes, str] | None:
        with self._folder_locked():
            return self._read()

    def replace(self, data: bytes, token: str) -> str | None:
        with self._folder_locked():
            found = self._read()
            if found is None or found[1] != token:
                return None
            return self._write(data, os.O_TRUNC)  # readers take the flock too: none sees it half-written

    def delete(self, token: str) -> bool:
        with self._folder_locked():
            found = self._read()
            if found is None or found[1] != token:
                return False
            self.path.unlink()
            return True


def lock_object(storage: Storage, key: str) -> LockObject:
    """The lock at ``key`` in ``storage``: an S3 object or a local file."""
    if isinstance(storage, S3Storage):
        return S3Lock(storage, key)
    if isinstance(storage, LocalStorage):
        return FileLock(storage, key)
    raise StorageError(f"no lease lock for {type(storage).__name__} storage")


@dataclass(frozen=True)
class Record:
    """What the lock object holds: who holds it, for what, and until when (UTC seconds since the epoch)."""

    owner: str
    purpose: str
    expires_at: float

    def to_bytes(self) -> bytes:
        return json.dumps(self.__dict__ | {"expires": _iso(self.expires_at)}).encode()

    @classmethod
    def parse(cls, data: bytes) -> Record | None:
        """The record; None for bytes that are not one (treated as expired: nothing can renew them)."""
        try:
            doc = json.loads(data)
            return cls(str(doc["owner"]), str(doc["purpose"]), float(doc["expires_at"]))
        except (ValueError, KeyError, TypeError):
            return None


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds")


class Lease:
    """One contender for the lock at ``lock``: ``acquire``, ``check`` before each write, ``release``."""

    def __init__(
        self,
        lock: LockObject,
        purpose: str,
        duration_s: float = LEASE_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.lock, self.purpose, self.duration_s, self.clock = lock, purpose, duration_s, clock
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._token: str | None = None
        self._expires_at = 0.0
        self._lost: str | None = None
        self._state = threading.Lock()  # the token and expiry, shared with the renewal thread
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def _record(self) -> Record:
        return Record(self.owner, self.purpose, self.clock() + self.duration_s)

    def _try(self) -> Record | None:
        """Take the lock if it is free or expired; None when taken, else the record of its holder."""
        mine = self._record()
        token = self.lock.create(mine.to_bytes())
        if token is None:
            found = self.lock.read()
            if found is None:
                return Record("nobody (just released)", "", 0.0)
            data, current = found
            holder = Record.parse(data)
            if holder is not None and holder.expires_at > self.clock():
                return holder
            mine = self._record()
            token = self.lock.replace(mine.to_bytes(), current)
            if token is None:
                return holder or Record("unknown", "", 0.0)
            who = f"{holder.owner} ({holder.purpose}), which expired at {_iso(holder.expires_at)}" if holder else data
            log.warning("took over the lock %s from %s", self.lock.url, who)
        self._token, self._expires_at = token, mine.expires_at
        return None

    def acquire(self, wait_s: float = WAIT_SECONDS) -> None:
        """Take the lock, waiting up to ``wait_s`` seconds for its holder; a LeaseError after that."""
        deadline = time.monotonic() + wait_s
        pause, waited = POLL_SECONDS[0], False
        while (holder := self._try()) is not None:
            if time.monotonic() >= deadline:
                raise LeaseError(
                    f"{self.lock.url} is held by {holder.owner} ({holder.purpose}) until {_iso(holder.expires_at)}: "
                    f"gave up after {wait_s:g}s; a holder that died releases it when its lease expires"
                )
            if not waited:
                log.info("waiting for %s, held by %s (%s)", self.lock.url, holder.owner, holder.purpose)
                waited = True
            time.sleep(min(pause * random.uniform(0.5, 1.0), max(0.0, deadline - time.monotonic())))
            pause = min(pause * 2, POLL_SECONDS[1])
        self._renewer = threading.Thread(target=self._renew_until_stopped, name="lease-renewal", daemon=True)
        self._renewer.start()

    def _renew_until_stopped(self) -> None:
        while not self._stop.wait(self.duration_s / 3):
            if not self.renew():
                return

    def renew(self) -> bool:
        """Extend the lease by its duration; False once it is lost (taken over). A renewal that fails for another
        reason (storage unreachable) is logged and tried again at the next one; ``check`` fails once the lease has
        run out."""
        with self._state:
            if self._lost or self._token is None:
                return False
            mine = self._record()
            try:
                token = self.lock.replace(mine.to_bytes(), self._token)
            except StorageError as exc:
                log.warning("could not renew %s: %s", self.lock.url, exc)
                return True
            if token is None:
                self._lost = f"{self.lock.url} was taken over by another holder"
                log.error("%s", self._lost)
                return False
            self._token, self._expires_at = token, mine.expires_at
            return True

    def check(self) -> None:
        """Raise a LeaseError unless this contender still holds the lock (call it before each write)."""
        with self._state:
            if self._token is None:
                raise LeaseError(f"{self.lock.url} is not held by {self.owner}")
            if self._lost:
                raise LeaseError(self._lost)
            if self.clock() >= self._expires_at:
                raise LeaseError(f"the lease on {self.lock.url} ran out at {_iso(self._expires_at)} before renewal")

    def release(self) -> bool:
        """Stop renewing and delete the lock if it is still ours; False when another holder had taken it over."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        with self._state:
            token, self._token = self._token, None
        if token is None:
            return False
        if self.lock.delete(token):
            return True
        log.warning("%s had been taken over by another holder before release", self.lock.url)
        return False


@contextlib.contextmanager
def held(
    storage: Storage, key: str, purpose: str, duration_s: float = LEASE_SECONDS, wait_s: float = WAIT_SECONDS
) -> Iterator[Lease]:
    """Hold the lock at ``key`` in ``storage`` for the ``with`` block; released however the block ends."""
    lease = Lease(lock_object(storage, key), purpose, duration_s)
    lease.acquire(wait_s)
    try:
        yield lease
    finally:
        lease.release()


def lock_key(model_root: str) -> str:
    """The lock that guards a model's aliases and its mirrored folder: ``<model root>/.lock``."""
    return f"{model_root}/.lock"
