"""The mirror step: copy @champion's serving bundle to storage, verify it, and only then move the pointer.

Layout under ``<storage.model_prefix>/<registry.model_name>/`` (``bundle.layout``): ``v<N>-<digest>/`` holds the
bundle files and ``manifest.json``, ``<digest>`` being the start of the manifest's sha256; ``champion.json`` names the
manifest of the version to serve. The pointer is written last, after every file has been read back and checked, so
it always names a complete version. A folder's name fixes its bytes: files already in place are not written again
(a re-run changes nothing), and a file that holds other bytes is refused, never replaced, so two registries sharing
a bucket (each with its own v1) write two folders and cannot change what the other's pointer names.

Everything runs under the model's lease (``agnews.lease``, the lock ``<root>/.lock`` in the same storage), which
``register.register`` also holds around the registry update: concurrent mirrors and registers end as if serial,
and storage always ends matching the registry. A mirror first completes a move of @champion made outside the
pipeline (``registry.record_champion``: @previous, ``promoted_by=manual``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import cast

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from agnews.errors import HistoryError, NotFoundError, RegistryError, StorageError
from agnews.lease import Lease, held, lock_key
from agnews.names import (
    BY_GATE,
    BY_ROLLOUT,
    CANDIDATE,
    CHAMPION,
    GATE_TAG,
    MIRROR_CANDIDATE,
    MIRROR_CHANGED,
    MIRROR_FOLDER,
    MIRROR_HOW,
    MIRROR_POINTER,
    MIRROR_RECORDED,
    MIRROR_VERSION,
    MIRROR_VIA,
    ONNX_INT8_ACCURACY,
    ONNX_INT8_AGREEMENT,
    PROMOTED_BY,
    REFERENCE_ARTIFACT,
    ROLLOUT_ID_TAG,
    ROLLOUT_MODE_TAG,
    ROLLOUT_WEIGHT_TAG,
    TEST_ACCURACY,
    TEST_F1_MACRO,
    How,
    Via,
)
from agnews.promotion import history
from agnews.promotion.registry import FencedClient, aliases, record_champion
from agnews.pyfunc import BUNDLE_PATH
from agnews.settings import RegistrySettings, StorageSettings
from agnews.storage import Storage, open_storage
from agnews.tracking import USERNAME_VARIABLE
from bundle.layout import (
    MANIFEST,
    MODES,
    POINTER,
    REFERENCE,
    Candidate,
    ContractError,
    Pointer,
    candidate_for,
    digest,
    manifest_bytes,
    parse_pointer,
    pointer_bytes,
    sha256,
    version_folder,
)

MANIFEST_METRICS = (TEST_ACCURACY, TEST_F1_MACRO, ONNX_INT8_ACCURACY, ONNX_INT8_AGREEMENT)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Mirrored:
    """The version that the pointer names, where the pointer is, and whether this call wrote anything."""

    version: int
    pointer: str
    changed: bool
    folder: str = ""
    recorded: str | None = None  # what record_champion did, when @champion had been moved outside the pipeline
    how: How = "gate"
    via: Via = "mirror"
    candidate: int | None = None  # the candidate served beside it, during a rollout

    def tags(self) -> dict[str, str]:
        tags = {
            MIRROR_VERSION: str(self.version),
            MIRROR_POINTER: self.pointer,
            MIRROR_CHANGED: str(self.changed).lower(),
            MIRROR_FOLDER: self.folder,
            MIRROR_HOW: self.how,
            MIRROR_VIA: self.via,
        }
        tags |= {MIRROR_RECORDED: self.recorded} if self.recorded else {}
        return tags | ({MIRROR_CANDIDATE: str(self.candidate)} if self.candidate is not None else {})


def stored_digest(storage: Storage, key: str) -> dict[str, str | int] | None:
    """sha256 and size of the object as read back from storage; None when it is absent."""
    return digest(storage.read_bytes(key)) if storage.exists(key) else None


def put_verified(storage: Storage, key: str, data: bytes) -> bool:
    """Write ``data`` unless storage already holds exactly it, then read it back; True when it was written. An object
    that holds other bytes is refused with a StorageError: a mirrored file is never replaced."""
    expected = digest(data)
    found = stored_digest(storage, key)
    if found == expected:
        return False
    if found is not None:
        raise StorageError(
            f"refusing to replace {storage.url(key)}: it holds {found}, not the {expected} its folder's manifest "
            "names, and a mirrored file is never replaced by other bytes; if it is damaged, delete that folder and "
            "mirror again"
        )
    storage.write_bytes(key, data)
    found = stored_digest(storage, key)
    if found != expected:
        raise StorageError(f"{storage.url(key)} reads back as {found}, not the {expected} that was written")
    return True


def download_bundle(name: str, version: int) -> dict[str, bytes]:
    """The files of the version's serving bundle, by name."""
    uri = f"models:/{name}/{version}/{BUNDLE_PATH}"
    with tempfile.TemporaryDirectory() as tmp:
        try:
            folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp))
        except (MlflowException, OSError) as exc:
            raise RegistryError(f"cannot download the serving bundle {uri}: {exc}") from None
        files = {path.name: path.read_bytes() for path in sorted(folder.iterdir()) if path.is_file()}
    if not files:
        raise RegistryError(f"{uri} holds no files: version {version} has no serving bundle")
    return files


def download_reference(run_id: str | None) -> bytes | None:
    """The reference profile that the version's train run logged (for the monitor step); None where it logged none."""
    if not run_id:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            return Path(
                mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=REFERENCE_ARTIFACT, dst_path=tmp)
            ).read_bytes()
        except (MlflowException, OSError):
            return None


def manifest(client: MlflowClient, version: ModelVersion, files: dict[str, bytes], reference: bytes | None) -> bytes:
    """The manifest's bytes; the same version always gives the same bytes (created_at is the version's creation)."""
    metrics = client.get_run(version.run_id).data.metrics if version.run_id else {}
    created = datetime.fromtimestamp(version.creation_timestamp / 1000, UTC).isoformat(timespec="seconds")
    kept = {name: metrics[name] for name in MANIFEST_METRICS if name in metrics}
    return manifest_bytes(version.name, int(version.version), version.run_id, kept, files, created, reference)


def read_pointer(storage: Storage, key: str) -> Pointer | None:
    """The current pointer; None when there is none (or it breaks the contract)."""
    try:
        return parse_pointer(storage.read_bytes(key), storage.url(key))
    except (NotFoundError, ContractError):
        return None


def champion_of(pointer: Pointer | None) -> history.Served | None:
    """The champion that ``pointer`` serves, as the history records it."""
    return history.Served(pointer.version, pointer.manifest_sha256) if pointer else None


def candidate_of(pointer: Pointer | None) -> history.Served | None:
    """The candidate that ``pointer`` serves beside the champion, as the history records it."""
    candidate = pointer.candidate if pointer else None
    return history.Served(candidate.version, candidate.manifest_sha256) if candidate else None


def point_to(
    storage: Storage, key: str, name: str, version: int, manifest: bytes, candidate: Candidate | None = None
) -> bool:
    """Write the pointer to ``v<version>-<digest>/manifest.json``, with ``candidate``, unless it already names both;
    True when written."""
    pointer = read_pointer(storage, key)
    if pointer is not None and (pointer.version, pointer.manifest_sha256, pointer.candidate) == (
        version,
        sha256(manifest),
        candidate,
    ):
        log.info("%s already names %s v%s: nothing to do", storage.url(key), name, version)
        return False
    updated = datetime.now(UTC).isoformat(timespec="seconds")
    storage.write_bytes(key, pointer_bytes(name, version, manifest, updated, candidate))
    beside = f", candidate v{candidate.version} ({candidate.mode})" if candidate else ""
    named = f"v{pointer.version}" if pointer else "nothing"
    log.info("%s now names %s v%s%s (it named %s)", storage.url(key), name, version, beside, named)
    return True


def root_key(registry: RegistrySettings, storage: StorageSettings) -> str:
    """The key of the model's root in storage: ``<storage.model_prefix>/<registry.model_name>``."""
    return f"{storage.model_prefix}/{registry.model_name}"


def model_root(registry: RegistrySettings, storage: StorageSettings) -> str:
    """The URL of the folder that holds ``champion.json``: the Lambda's MODEL_URI."""
    return open_storage(storage).url(root_key(registry, storage))


@dataclass(frozen=True)
class ModelStore:
    """A registered model and its place in storage: the root ``<storage.model_prefix>/<registry.model_name>``."""

    name: str
    storage: Storage
    root: str

    @classmethod
    def open(cls, registry: RegistrySettings, storage: StorageSettings) -> ModelStore:
        return cls(registry.model_name, open_storage(storage), root_key(registry, storage))

    @property
    def pointer(self) -> str:
        """The key of ``champion.json``."""
        return f"{self.root}/{POINTER}"


@contextlib.contextmanager
def model_lease(model: ModelStore, settings: StorageSettings, purpose: str) -> Iterator[tuple[Lease, MlflowClient]]:
    """Hold the model's lease (``<root>/.lock`` in its storage) for the ``with`` block, with a client whose every
    registry write first checks that the lease is still held (``registry.FencedClient``)."""
    with held(model.storage, lock_key(model.root), f"{purpose} {model.name}", settings) as lease:
        yield lease, FencedClient(lease.check)


def served_version(model: ModelStore) -> int | None:
    """The version that ``champion.json`` names; None when there is none."""
    pointer = read_pointer(model.storage, model.pointer)
    return pointer.version if pointer else None


def version_files(client: MlflowClient, version: ModelVersion) -> tuple[str, dict[str, bytes]]:
    """The folder that ``version`` mirrors to (``v<N>-<digest>``) and its files by name, manifest last."""
    number = int(version.version)
    files = download_bundle(version.name, number)
    reference = download_reference(version.run_id)
    manifest_doc = manifest(client, version, files, reference)
    beside = {REFERENCE: reference} if reference is not None else {}  # the monitor step's, never the Lambda's
    return version_folder(number, sha256(manifest_doc)), files | beside | {MANIFEST: manifest_doc}


def history_entry(
    version: ModelVersion,
    to: history.Served,
    previous: history.Served | None,
    how: How,
    via: Via,
    recovered: bool = False,
    candidate: history.Served | None = None,
) -> history.Entry:
    """The history entry of a change of what is served: the champion from ``previous`` to ``to``, with ``candidate``
    beside it; who made it and the gate's verdict are ``version``'s (the champion's, or the candidate's for a
    rollout's start or abort: ``subject``)."""
    who = os.environ.get(USERNAME_VARIABLE) or version.tags.get(PROMOTED_BY) or via
    gate = version.tags.get(GATE_TAG, "")
    return history.Entry(datetime.now(UTC), to, previous, how, who, gate, via, recovered, candidate)


def how_tagged(version: ModelVersion) -> How:
    """How ``version`` became @champion as its ``promoted_by`` tag says: ``gate``, ``promote`` (a rollout), else
    ``manual`` (which a rollback is too)."""
    tagged: dict[str, How] = {BY_GATE: "gate", BY_ROLLOUT: "promote"}
    return tagged.get(version.tags.get(PROMOTED_BY, ""), "manual")


def how_changed(version: ModelVersion, previous: Pointer | None, candidate: Candidate | None) -> How:
    """How what is served changed when the champion became ``version`` with ``candidate`` beside it, from
    ``previous``: the candidate's mode where only a candidate arrived, ``abort`` where only one left, else as the
    version's tag says (``how_tagged``)."""
    if previous is not None and previous.version == int(version.version):
        if candidate is not None:
            return cast(How, candidate.mode)
        if previous.candidate is not None:
            return "abort"
    return how_tagged(version)


def subject(
    client: MlflowClient, champion: ModelVersion, how: How, candidate: Candidate | None, previous: Pointer | None
) -> ModelVersion:
    """The version that a history entry speaks of: the candidate for a rollout's start (``how`` its mode) or abort,
    else the champion."""
    if how in MODES and candidate is not None:
        return client.get_model_version(champion.name, str(candidate.version))
    if how == "abort" and previous is not None and previous.candidate is not None:
        return client.get_model_version(champion.name, str(previous.candidate.version))
    return champion


def record_served(model: ModelStore, lease: Lease, client: MlflowClient, via: Via) -> history.Entry | None:
    """Append the change that ``champion.json`` shows and the history lacks, marked recovered: the pointer names a
    champion or candidate that the newest entry does not (the change's append failed, or its process died between
    the two writes). None when the two agree, or there is no pointer."""
    pointer = read_pointer(model.storage, model.pointer)
    newest = history.newest(model.storage, model.root)
    to, candidate = champion_of(pointer), candidate_of(pointer)
    if pointer is None or to is None or (newest is not None and (newest.to, newest.candidate) == (to, candidate)):
        return None
    version = client.get_model_version(model.name, str(pointer.version))
    if newest is not None and newest.to == to:
        how = cast(How, pointer.candidate.mode) if pointer.candidate else "abort"
    else:
        how = how_tagged(version)
    previous = newest.to if newest else None
    entry = history_entry(version, to, previous, how, via, recovered=True, candidate=candidate)
    lease.check()
    url = history.append(model.storage, model.root, entry)
    log.warning("%s serves %s, which the promotion history lacked: recorded in %s", model.pointer, to, url)
    return entry


def registry_candidate(client: MlflowClient, name: str) -> tuple[int, str, float, str] | None:
    """@candidate's version, mode, weight and rollout id, as its tags say (a version made @candidate in the UI,
    without them, meets traffic in shadow, under a rollout id of its version); None when there is no @candidate, or
    it is @champion too (a promotion stopped between its two alias moves)."""
    current = aliases(client, name)
    number = current.get(CANDIDATE)
    if number is None or number == current.get(CHAMPION):
        return None
    tags = client.get_model_version(name, str(number)).tags
    mode = tags.get(ROLLOUT_MODE_TAG, "shadow")
    try:
        weight = float(tags.get(ROLLOUT_WEIGHT_TAG, "0"))
    except ValueError:
        weight = 0.0
    if mode not in MODES or not 0 <= weight <= 1:
        mode, weight = "shadow", 0.0
    return number, mode, weight if mode == "canary" else 0.0, tags.get(ROLLOUT_ID_TAG) or f"v{number}"


def write_version(model: ModelStore, lease: Lease, folder: str, files: dict[str, bytes]) -> list[str]:
    """Copy a version's files into ``folder`` below the model's root and verify them, the manifest last (a folder
    with a manifest is complete); the files written."""
    written = []
    for file, data in files.items():
        lease.check()
        if put_verified(model.storage, f"{model.root}/{folder}/{file}", data):
            written.append(file)
    return written


def stage_candidate(model: ModelStore, lease: Lease, client: MlflowClient) -> Candidate | None:
    """@candidate's bundle copied beside the champion's and verified (``registry_candidate``), as champion.json
    names it; None when there is no candidate."""
    found = registry_candidate(client, model.name)
    if found is None:
        return None
    number, mode, weight, rollout = found
    folder, files = version_files(client, client.get_model_version(model.name, str(number)))
    write_version(model, lease, folder, files)
    return candidate_for(number, files[MANIFEST], mode, weight, rollout)


def publish(
    model: ModelStore, lease: Lease, client: MlflowClient, via: Via, how: How | None = None, recorded: str | None = None
) -> Mirrored:
    """Copy @champion's bundle and manifest into its folder, and @candidate's beside it where a rollout is under way
    (``stage_candidate``), verify them, then write the pointer and, when it changed, append the change to the
    promotion history; every write under ``lease``, checked first. ``via`` says which step does it, ``how`` how
    @champion moved (None: ``ui`` after ``record_champion`` completed a move made outside the pipeline, else as the
    tags say, ``how_changed``); ``recorded`` what ``record_champion`` said."""
    storage, name, root = model.storage, model.name, model.root
    number = aliases(client, name).get(CHAMPION)
    if number is None:
        raise RegistryError(f"model '{name}' has no @{CHAMPION}: run the register step first")
    version = client.get_model_version(name, str(number))
    folder, files = version_files(client, version)
    written = write_version(model, lease, folder, files)
    candidate = stage_candidate(model, lease, client)
    previous = read_pointer(storage, model.pointer)
    how = how or ("ui" if recorded else how_changed(version, previous, candidate))
    lease.check()
    moved = point_to(storage, model.pointer, name, number, files[MANIFEST], candidate)
    if moved:
        lease.check()
        to = history.Served(number, sha256(files[MANIFEST]))
        served = history.Served(candidate.version, candidate.manifest_sha256) if candidate else None
        about = subject(client, version, how, candidate, previous)
        entry = history_entry(about, to, champion_of(previous), how, via, candidate=served)
        try:
            log.info("recorded in the promotion history: %s", history.append(storage, root, entry))
        except HistoryError as exc:
            raise HistoryError(
                f"{storage.url(model.pointer)} names {name} v{number} now, but {exc}; the next register, mirror or "
                "webhook reconcile records the move (marked recovered)"
            ) from None
    changed = bool(written) or moved
    beside = candidate.version if candidate else None
    return Mirrored(number, storage.url(model.pointer), changed, folder, recorded, how, via, beside)


@dataclass(frozen=True)
class Reconciliation:
    """What a reconcile found: the registry's @champion, the version storage serves after it, the mirror it ran
    (None when storage already served @champion, or there is no @champion) and the history entry it recovered (None
    when the history already recorded what storage served). Both None: registry, storage and history agree."""

    champion: int | None
    served: int | None
    mirrored: Mirrored | None
    recovered: history.Entry | None = None
    candidate: int | None = None  # the candidate that storage serves after it


def candidate_agrees(client: MlflowClient, name: str, pointer: Pointer | None) -> bool:
    """Whether ``champion.json`` serves the candidate that the registry names (or none where it names none)."""
    found = registry_candidate(client, name)
    served = pointer.candidate if pointer else None
    if found is None or served is None:
        return found is None and served is None
    return found == (served.version, served.mode, served.weight, served.rollout)


def reconcile(model: ModelStore, lease: Lease, client: MlflowClient, via: Via) -> Reconciliation:
    """Bring storage in line with the registry, as the first thing a register or rollout step does and what the
    webhook receiver does on each delivery and timer: record a change that the history lacks (``record_served``),
    complete a move of @champion made outside the pipeline (``record_champion``) and a rollout's promotion stopped
    between its alias moves (@candidate left on @champion), then mirror @champion if ``champion.json`` names another
    version or another candidate than @candidate (a move in the UI, or a step killed before its mirror). ``via``:
    which step or what in the receiver (a delivery, its timer) runs it."""
    found = record_served(model, lease, client, via)
    pointer = read_pointer(model.storage, model.pointer)
    served = pointer.version if pointer else None
    recorded = record_champion(client, model.name, served)
    current = aliases(client, model.name)
    champion = current.get(CHAMPION)
    if champion is not None and current.get(CANDIDATE) == champion:
        client.delete_registered_model_alias(model.name, CANDIDATE)
        log.warning("v%s is @%s and still @%s: its promotion is completed", champion, CHAMPION, CANDIDATE)
    if champion is None or (champion == served and candidate_agrees(client, model.name, pointer)):
        beside = pointer.candidate.version if pointer and pointer.candidate else None
        return Reconciliation(champion, served, None, found, beside)
    candidate = f" and @{CANDIDATE} v{current[CANDIDATE]}" if current.get(CANDIDATE, champion) != champion else ""
    log.warning(
        "storage serves %s, but @%s is v%s%s: mirroring %s first",
        f"v{served}" if served is not None else "nothing",
        CHAMPION,
        champion,
        candidate,
        "them" if candidate else f"v{champion}",
    )
    mirrored = publish(model, lease, client, via, recorded=recorded)
    return Reconciliation(champion, mirrored.version, mirrored, found, mirrored.candidate)


def mirror(registry: RegistrySettings, storage: StorageSettings) -> Mirrored:
    """The mirror step: copy ``models:/<name>@champion``'s bundle and manifest under ``v<N>-<digest>/``, verify them,
    then write the pointer; under the model's lease, after recording a move that the history lacks and completing a
    move of @champion made outside the pipeline."""
    model = ModelStore.open(registry, storage)
    with model_lease(model, storage, "mirror") as (lease, client):
        record_served(model, lease, client, "mirror")
        recorded = record_champion(client, model.name, served_version(model))
        return publish(model, lease, client, "mirror", recorded=recorded)


def promotion_history(registry: RegistrySettings, storage: StorageSettings) -> list[history.Entry]:
    """The model's promotion history in storage, newest first."""
    model = ModelStore.open(registry, storage)
    return history.entries(model.storage, model.root)
