"""The promotion history: one immutable object per change of what ``champion.json`` serves (the champion, and a
rollout's candidate), beside the model in storage.

``<storage.model_prefix>/<registry.model_name>/history/<UTC time>-v<N>.json``, the time written so that the names
sort in time order (``20250102T030405.123456Z``). Each is written once, with a conditional create
(``Storage.create``), under the model's lease, right after ``champion.json`` changed: the version it moved from and
to with their manifests' sha256, how (@champion moved by the ``gate``, ``manual``, ``rollback``, or ``ui`` for a move
outside the project's steps; a rollout's ``shadow`` or ``canary`` start, ``promote`` and ``abort``, with the
candidate served after it), how storage learned of it (``via``: a webhook ``delivery``, the receiver's ``timer``, a
``register``, a ``mirror``, a ``rollout`` step or the ``monitor`` acting on its verdict), who (the MLflow user where
the tracking server has auth, else the version's ``promoted_by``, else the step), when, and the gate's verdict at
registration (the candidate's, for a rollout's start or abort). The Lambda never reads it.

The entries form a chain: each holds the sha256 of its own fields (``digest``) and of the stored bytes of the entry
before it (``after``), and reading checks both, so an entry rewritten, removed or put in between by hand stops the
reading at the first broken link, named in one line. A move whose entry is missing (its append failed, or its process
died between moving the pointer and appending) is appended later, marked ``recovered``, by the next register, mirror
or webhook reconcile (``mirror.record_served``). Entries from before the chain have neither field.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime

from agnews.errors import HistoryError, StorageError
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
    """One change of the served champion; ``after`` (set by ``append``) links it to the entry before it."""

    at: datetime
    to: Served
    previous: Served | None
    how: str
    who: str
    gate: str
    via: str = ""  # how storage learned of the move: delivery, timer, register or mirror (empty in older entries)
    recovered: bool = False  # appended after the move, which went unrecorded when it happened
    candidate: Served | None = None  # the rollout's candidate served beside the champion after the change
    after: str | None = field(default=None, compare=False)

    def _fields(self) -> dict:
        doc = asdict(self) | {"at": self.at.isoformat(timespec="microseconds")}
        doc["from"] = doc.pop("previous")
        if doc["candidate"] is None:  # an entry outside a rollout is written as before rollouts
            del doc["candidate"]
        return doc

    @staticmethod
    def _digest(fields: dict) -> str:
        return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def to_bytes(self) -> bytes:
        fields = self._fields()
        return json.dumps(fields | {"digest": self._digest(fields)}, indent=2).encode()

    @classmethod
    def parse(cls, data: bytes, url: str) -> Entry:
        """The entry in ``data``; a HistoryError when it is not one, or its fields do not match its digest."""
        try:
            doc = json.loads(data)
            digest = doc.pop("digest", None)
            previous = Served(**doc["from"]) if doc["from"] else None
            entry = cls(
                datetime.fromisoformat(doc["at"]),
                Served(**doc["to"]),
                previous,
                doc["how"],
                doc["who"],
                doc["gate"],
                str(doc.get("via", "")),
                bool(doc.get("recovered", False)),
                Served(**doc["candidate"]) if doc.get("candidate") else None,
                doc.get("after"),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise HistoryError(f"{url} is not a promotion history entry: {exc}") from None
        if digest is not None and digest != cls._digest(doc):
            raise HistoryError(
                f"{url}: the promotion history's chain is broken here: its fields do not match its digest "
                f"{str(digest)[:12]} (the entry was rewritten)"
            )
        return entry

    def __str__(self) -> str:
        moved = f"{self.previous} -> {self.to}" if self.previous else f"nothing -> {self.to}"
        how = f"{self.how} (recovered)" if self.recovered else self.how
        via = f", via: {self.via}" if self.via else ""
        line = f"{self.at.isoformat(timespec='seconds')}  {moved}  how: {how}, who: {self.who}{via}"
        line += f", candidate: {self.candidate}" if self.candidate else ""
        return f"{line}; gate: {self.gate}" if self.gate else line


def entry_key(root: str, entry: Entry) -> str:
    return f"{root}/{FOLDER}/{entry.at.astimezone(UTC).strftime(TIME_FORMAT)}-v{entry.to.version}.json"


def _keys(storage: Storage, root: str) -> list[str]:
    """The entries' keys, oldest first."""
    return sorted(key for key in storage.list(f"{root}/{FOLDER}/") if key.endswith(".json"))


def _write_failed(storage: Storage, key: str, exc: StorageError) -> HistoryError:
    return HistoryError(f"cannot record the move in the promotion history ({storage.url(key)}): {exc}")


def append(storage: Storage, root: str, entry: Entry) -> str:
    """Write ``entry`` below the model root ``root``, linked to the newest entry, never over another; its URL."""
    key = entry_key(root, entry)
    try:
        keys = _keys(storage, root)
        after = hashlib.sha256(storage.read_bytes(keys[-1])).hexdigest() if keys else None
        created = storage.create(key, replace(entry, after=after).to_bytes())
    except HistoryError:
        raise
    except StorageError as exc:
        raise _write_failed(storage, key, exc) from None
    if created is None:
        raise HistoryError(f"{storage.url(key)} exists: a promotion history entry is never rewritten")
    return storage.url(key)


def newest(storage: Storage, root: str) -> Entry | None:
    """The newest entry of the history of the model at ``root``; None for none."""
    keys = _keys(storage, root)
    return Entry.parse(storage.read_bytes(keys[-1]), storage.url(keys[-1])) if keys else None


def entries(storage: Storage, root: str) -> list[Entry]:
    """The history of the model at ``root``, newest first, its chain checked from the oldest entry on: a
    HistoryError names the first entry that is not what the chain says."""
    found: list[Entry] = []
    before: bytes | None = None
    for key in _keys(storage, root):
        data, url = storage.read_bytes(key), storage.url(key)
        entry = Entry.parse(data, url)
        expected = None if before is None else hashlib.sha256(before).hexdigest()
        if "digest" in json.loads(data):
            if entry.after != expected:
                where = "it is the first entry" if expected is None else f"the entry before it has {expected[:12]}"
                raise HistoryError(
                    f"{url}: the promotion history's chain is broken here: it follows sha256 "
                    f"{(entry.after or 'nothing')[:12]}, but {where} (an entry was rewritten, removed or added)"
                )
        elif found and "digest" in json.loads(before or b"{}"):
            raise HistoryError(f"{url}: the promotion history's chain is broken here: the entry has no digest")
        found.append(entry)
        before = data
    return found[::-1]


def served_at(history: list[Entry], when: datetime) -> Entry | None:
    """The entry that made the version served at ``when`` (a history newest first); None before the first."""
    return next((entry for entry in history if entry.at <= when), None)
