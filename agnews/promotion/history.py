"""The promotion history: one immutable object per change of the served champion, beside the model in storage.

``<storage.model_prefix>/<registry.model_name>/history/<UTC time>-v<N>.json``, the time written so that the names
sort in time order (``20250102T030405.123456Z``). Each is written once, with a conditional create
(``Storage.create``), under the model's lease, right after ``champion.json`` moved: the version it moved from and to
with their manifests' sha256, how (``gate``, ``manual``, ``rollback``, ``ui``, ``reconcile``), who (the MLflow user
where the tracking server has auth, else the version's ``promoted_by``), when, and the gate's verdict at
registration. The Lambda never reads it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from agnews.errors import StorageError
from agnews.storage import Storage

FOLDER = "history"
TIME_FORMAT = "%Y%m%dT%H%M%S.%fZ"


@dataclass(frozen=True)
class Served:
    """A version as ``champion.json`` names it."""

    version: int
    manifest_sha256: str

    def __str__(self) -> str:
        return f"v{self.version} (manifest {self.manifest_sha256[:12]})"


@dataclass(frozen=True)
class Entry:
    """One change of the served champion."""

    at: datetime
    to: Served
    previous: Served | None
    how: str
    who: str
    gate: str

    def to_bytes(self) -> bytes:
        doc = asdict(self) | {"at": self.at.isoformat(timespec="microseconds")}
        doc["from"] = doc.pop("previous")
        return json.dumps(doc, indent=2).encode()

    @classmethod
    def parse(cls, data: bytes, url: str) -> Entry:
        try:
            doc = json.loads(data)
            previous = Served(**doc["from"]) if doc["from"] else None
            return cls(
                datetime.fromisoformat(doc["at"]), Served(**doc["to"]), previous, doc["how"], doc["who"], doc["gate"]
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise StorageError(f"{url} is not a promotion history entry: {exc}") from None

    def __str__(self) -> str:
        moved = f"{self.previous} -> {self.to}" if self.previous else f"nothing -> {self.to}"
        line = f"{self.at.isoformat(timespec='seconds')}  {moved}  how: {self.how}, who: {self.who}"
        return f"{line}; gate: {self.gate}" if self.gate else line


def entry_key(root: str, entry: Entry) -> str:
    return f"{root}/{FOLDER}/{entry.at.astimezone(UTC).strftime(TIME_FORMAT)}-v{entry.to.version}.json"


def append(storage: Storage, root: str, entry: Entry) -> str:
    """Write ``entry`` below the model root ``root``, never over another; its URL."""
    key = entry_key(root, entry)
    if storage.create(key, entry.to_bytes()) is None:
        raise StorageError(f"{storage.url(key)} exists: a promotion history entry is never rewritten")
    return storage.url(key)


def entries(storage: Storage, root: str) -> list[Entry]:
    """The history of the model at ``root``, newest first."""
    keys = sorted((key for key in storage.list(f"{root}/{FOLDER}/") if key.endswith(".json")), reverse=True)
    return [Entry.parse(storage.read_bytes(key), storage.url(key)) for key in keys]


def served_at(history: list[Entry], when: datetime) -> Entry | None:
    """The entry that made the version served at ``when`` (a history newest first); None before the first."""
    return next((entry for entry in history if entry.at <= when), None)
