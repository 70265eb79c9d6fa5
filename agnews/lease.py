"""A lease lock in storage: one holder at a time per key, across processes and machines that share the store.

The lock is a small object that only storage's conditional writes touch (``Storage.create``, ``swap``,
``delete_if``: ``If-None-Match``/``If-Match`` in S3, a link and a ``flock`` in a folder), so two contenders can never
both believe they hold it.

The record names its owner and when it expires (UTC wall-clock time, so the clocks of the hosts that share a
store must agree to well within a lease's duration, as NTP keeps them). The holder renews it from a background
thread every third of its duration. A holder that died, or was paused, stops renewing; once its record has expired,
the next contender takes the lock over with the same conditional write, so only one of them does. Contenders poll
with capped exponential backoff.

Fencing: ``Lease.check()`` re-reads the lock right before each write the holder makes, and raises when the lease
was lost (taken over, or run out), so that a holder that was paused past its lease changes nothing more. What is
left is the time between a check and the write it guards, which is a single request.
"""

from __future__ import annotations

import contextlib
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

from agnews.errors import LeaseError, StorageError
from agnews.settings import StorageSettings
from agnews.storage import Storage

POLL_SECONDS = (0.05, 2.0)  # the first and the longest pause between two tries

log = logging.getLogger(__name__)


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
    """One contender for the lock at ``key`` in ``storage``: ``acquire``, ``check`` before each write, ``release``."""

    def __init__(
        self, storage: Storage, key: str, purpose: str, duration_s: float, clock: Callable[[], float] = time.time
    ) -> None:
        self.storage, self.key, self.url = storage, key, storage.url(key)
        self.purpose, self.duration_s, self.clock = purpose, duration_s, clock
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
        token = self.storage.create(self.key, mine.to_bytes())
        if token is None:
            found = self.storage.read_token(self.key)
            if found is None:
                return Record("nobody (just released)", "", 0.0)
            data, current = found
            holder = Record.parse(data)
            if holder is not None and holder.expires_at > self.clock():
                return holder
            mine = self._record()
            token = self.storage.swap(self.key, mine.to_bytes(), current)
            if token is None:
                return holder or Record("unknown", "", 0.0)
            who = f"{holder.owner} ({holder.purpose}), which expired at {_iso(holder.expires_at)}" if holder else data
            log.warning("took over the lock %s from %s", self.url, who)
        self._token, self._expires_at = token, mine.expires_at
        return None

    def acquire(self, wait_s: float) -> None:
        """Take the lock, waiting up to ``wait_s`` seconds for its holder; a LeaseError after that."""
        deadline = time.monotonic() + wait_s
        pause, waited = POLL_SECONDS[0], False
        while (holder := self._try()) is not None:
            if time.monotonic() >= deadline:
                raise LeaseError(
                    f"{self.url} is held by {holder.owner} ({holder.purpose}) until {_iso(holder.expires_at)}: "
                    f"gave up after {wait_s:g}s; a holder that died releases it when its lease expires"
                )
            if not waited:
                log.info("waiting for %s, held by %s (%s)", self.url, holder.owner, holder.purpose)
                waited = True
            time.sleep(min(pause * random.uniform(0.5, 1.0), max(0.0, deadline - time.monotonic())))
            pause = min(pause * 2, POLL_SECONDS[1])
        self._renewer = threading.Thread(target=self._renew_until_stopped, name="lease-renewal", daemon=True)
        self._renewer.start()

    def _renew_until_stopped(self) -> None:
        while not self._stop.wait(self.duration_s / 3):
            if not self.renew():
                return

    def _lose(self, why: str) -> None:
        self._lost = why
        log.error("%s", why)

    def renew(self) -> bool:
        """Extend the lease by its duration; False once it is lost (taken over). A renewal that fails for another
        reason (storage unreachable) is logged and tried again at the next one; ``check`` fails once the lease has
        run out."""
        with self._state:
            if self._lost or self._token is None:
                return False
            mine = self._record()
            try:
                token = self.storage.swap(self.key, mine.to_bytes(), self._token)
            except StorageError as exc:
                log.warning("could not renew %s: %s", self.url, exc)
                return True
            if token is None:
                self._lose(f"the lease on {self.url} was taken over by another holder")
                return False
            self._token, self._expires_at = token, mine.expires_at
            return True

    def check(self) -> None:
        """Raise a LeaseError unless this contender still holds the lock: its lease has not run out, and the lock in
        storage is still the one it wrote (the fence that each write under the lease goes through first)."""
        with self._state:
            if self._token is None:
                raise LeaseError(f"{self.url} is not held by {self.owner}")
            if not self._lost and self.clock() >= self._expires_at:
                self._lose(f"the lease on {self.url} ran out at {_iso(self._expires_at)}, before it was renewed")
            if not self._lost:
                found = self.storage.read_token(self.key)
                if found is None or found[1] != self._token:
                    self._lose(f"the lease on {self.url} was taken over by another holder")
            if self._lost:
                raise LeaseError(f"{self._lost}: {self.purpose} stopped before its next write and changed nothing more")

    def release(self) -> bool:
        """Stop renewing and delete the lock if it is still ours; False when another holder had taken it over."""
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        with self._state:
            token, self._token = self._token, None
        if token is None:
            return False
        if self.storage.delete_if(self.key, token):
            return True
        log.warning("%s had been taken over by another holder before release", self.url)
        return False


@contextlib.contextmanager
def held(storage: Storage, key: str, purpose: str, settings: StorageSettings) -> Iterator[Lease]:
    """Hold the lock at ``key`` in ``storage`` for the ``with`` block, released however the block ends: a lease of
    ``settings.lease_s`` seconds, waiting up to ``settings.lease_wait_s`` for it."""
    lease = Lease(storage, key, purpose, settings.lease_s)
    lease.acquire(settings.lease_wait_s)
    try:
        yield lease
    finally:
        lease.release()


def lock_key(model_root: str) -> str:
    """The lock that guards a model's aliases and its mirrored folder: ``<model root>/.lock``."""
    return f"{model_root}/.lock"
