"""Publishing: copy @champion's serving bundle to storage, verify it, and only then move the pointer.

Layout under ``<storage.model_prefix>/<registry.model_name>/`` (``bundle.layout``): ``v<N>-<digest>/`` holds the
bundle files and ``manifest.json``, ``<digest>`` being the start of the manifest's sha256; ``champion.json`` names the
manifest of the version to serve. The pointer is written last, after every file has been read back and checked, so
it always names a complete version. A folder's name fixes its bytes: files already in place are not written again
(a re-run changes nothing), and a file that holds other bytes is refused, never replaced, so two registries sharing
a bucket (each with its own v1) write two folders and cannot change what the other's pointer names.

Everything runs under the model's lease (``agnews.lease``, the lock ``<root>/.lock`` in the same storage), which
``promotion.register`` also holds around the registry update: concurrent mirrors and registers end as if serial,
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
from typing import Literal

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig

from agnews import history
from agnews.errors import NotFoundError, RegistryError, StorageError
from agnews.lease import Lease, held, lock_key
from agnews.pyfunc import BUNDLE_PATH
from agnews.registry import CHAMPION, PROMOTED_BY, FencedClient, aliases, record_champion
from agnews.storage import Storage, open_storage
from agnews.tracking import USERNAME_VARIABLE
from bundle.layout import (
    MANIFEST,
    POINTER,
    ContractError,
    digest,
    manifest_bytes,
    parse_pointer,
    pointer_bytes,
    sha256,
    version_folder,
)

MANIFEST_METRICS = ("test_accuracy", "test_f1_macro", "onnx_int8_accuracy", "onnx_int8_agreement")
# How @champion came to name a version: the gate, registry.version, registry.rollback, a move in the MLflow UI (or
# its REST API), or a mirror that caught storage up with the registry.
How = Literal["gate", "manual", "rollback", "ui", "reconcile"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Mirrored:
    """The version that the pointer names, where the pointer is, and whether this call wrote anything."""

    version: int
    pointer: str
    changed: bool
    folder: str = ""
    recorded: str | None = None  # what record_champion did, when @champion had been moved outside the pipeline
    how: How = "reconcile"

    def tags(self) -> dict[str, str]:
        tags = {
            "mirror.version": str(self.version),
            "mirror.pointer": self.pointer,
            "mirror.changed": str(self.changed).lower(),
            "mirror.folder": self.folder,
            "mirror.how": self.how,
        }
        return tags | ({"mirror.recorded": self.recorded} if self.recorded else {})


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


def manifest(client: MlflowClient, version: ModelVersion, files: dict[str, bytes]) -> bytes:
    """The manifest's bytes; the same version always gives the same bytes (created_at is the version's creation)."""
    metrics = client.get_run(version.run_id).data.metrics if version.run_id else {}
    created = datetime.fromtimestamp(version.creation_timestamp / 1000, UTC).isoformat(timespec="seconds")
    kept = {name: metrics[name] for name in MANIFEST_METRICS if name in metrics}
    return manifest_bytes(version.name, int(version.version), version.run_id, kept, files, created)


def read_pointer(storage: Storage, key: str) -> dict:
    """The current pointer's version and manifest sha256, or {} when there is none (or it breaks the contract)."""
    try:
        pointer = parse_pointer(storage.read_bytes(key), storage.url(key))
    except (NotFoundError, ContractError):
        return {}
    return {"version": pointer.version, "manifest_sha256": pointer.manifest_sha256}


def point_to(storage: Storage, key: str, name: str, version: int, manifest: bytes) -> bool:
    """Write the pointer to ``v<version>-<digest>/manifest.json`` unless it already names it; True when written."""
    pointer = read_pointer(storage, key)
    if pointer == {"version": version, "manifest_sha256": digest(manifest)["sha256"]}:
        log.info("%s already names %s v%s: nothing to do", storage.url(key), name, version)
        return False
    updated = datetime.now(UTC).isoformat(timespec="seconds")
    storage.write_bytes(key, pointer_bytes(name, version, manifest, updated))
    log.info("%s now names %s v%s (it named %s)", storage.url(key), name, version, pointer.get("version", "nothing"))
    return True


def root_key(cfg: DictConfig) -> str:
    """The key of the model's root in storage: ``<storage.model_prefix>/<registry.model_name>``."""
    return f"{cfg.storage.model_prefix}/{cfg.registry.model_name}"


def model_root(cfg: DictConfig) -> str:
    """The URL of the folder that holds ``champion.json``: the Lambda's MODEL_URI."""
    return open_storage(cfg.storage).url(root_key(cfg))


@contextlib.contextmanager
def model_lease(cfg: DictConfig, storage: Storage, purpose: str) -> Iterator[tuple[Lease, MlflowClient]]:
    """Hold the model's lease (``<root>/.lock`` in ``storage``) for the ``with`` block, with a client whose every
    registry write first checks that the lease is still held (``registry.FencedClient``)."""
    with held(storage, lock_key(root_key(cfg)), f"{purpose} {cfg.registry.model_name}", cfg.storage) as lease:
        yield lease, FencedClient(lease.check)


def served_version(storage: Storage, cfg: DictConfig) -> int | None:
    """The version that ``champion.json`` names; None when there is none."""
    return read_pointer(storage, f"{root_key(cfg)}/{POINTER}").get("version")


def version_files(client: MlflowClient, version: ModelVersion) -> tuple[str, dict[str, bytes]]:
    """The folder that ``version`` mirrors to (``v<N>-<digest>``) and its files by name, manifest last."""
    number = int(version.version)
    files = download_bundle(version.name, number)
    manifest_doc = manifest(client, version, files)
    return version_folder(number, sha256(manifest_doc)), files | {MANIFEST: manifest_doc}


def history_entry(version: ModelVersion, manifest_doc: bytes, previous: dict, how: How) -> history.Entry:
    """The history entry of a move of the served champion from ``previous`` (``read_pointer``) to ``version``."""
    who = os.environ.get(USERNAME_VARIABLE) or version.tags.get(PROMOTED_BY, "unknown")
    return history.Entry(
        datetime.now(UTC),
        history.Served(int(version.version), sha256(manifest_doc)),
        history.Served(**previous) if previous else None,
        how,
        who,
        version.tags.get("gate", ""),
    )


def publish(
    cfg: DictConfig, storage: Storage, lease: Lease, client: MlflowClient, how: How, recorded: str | None = None
) -> Mirrored:
    """Copy @champion's bundle and manifest into its folder, verify them, then write the pointer and, when it moved,
    append the move to the promotion history; every write under ``lease``, checked first. ``how`` says how
    @champion moved; ``recorded`` what ``record_champion`` said, for the run's tags."""
    name, root = cfg.registry.model_name, root_key(cfg)
    pointer = f"{root}/{POINTER}"
    number = aliases(client, name).get(CHAMPION)
    if number is None:
        raise RegistryError(f"model '{name}' has no @{CHAMPION}: run the register step first")
    version = client.get_model_version(name, str(number))
    folder, files = version_files(client, version)
    written = []
    for file, data in files.items():  # the manifest last: a folder with a manifest is complete
        lease.check()
        if put_verified(storage, f"{root}/{folder}/{file}", data):
            written.append(file)
    previous = read_pointer(storage, pointer)
    lease.check()
    moved = point_to(storage, pointer, name, number, files[MANIFEST])
    if moved:
        lease.check()
        entry = history_entry(version, files[MANIFEST], previous, how)
        log.info("recorded in the promotion history: %s", history.append(storage, root, entry))
    return Mirrored(number, storage.url(pointer), bool(written) or moved, folder, recorded, how)


def reconcile(cfg: DictConfig, storage: Storage, lease: Lease, client: MlflowClient) -> Mirrored | None:
    """Bring storage in line with the registry, as the first thing a register does: complete a move of @champion made
    outside the pipeline (``record_champion``), then mirror @champion if ``champion.json`` names another version
    (a move in the UI, or a promotion whose mirror was killed); None when storage already serves @champion."""
    served = served_version(storage, cfg)
    recorded = record_champion(client, cfg.registry.model_name, served)
    champion = aliases(client, cfg.registry.model_name).get(CHAMPION)
    if champion is None or champion == served:
        return None
    log.warning(
        "storage serves %s, but @%s is v%s: mirroring v%s first",
        f"v{served}" if served is not None else "nothing",
        CHAMPION,
        champion,
        champion,
    )
    return publish(cfg, storage, lease, client, "ui" if recorded else "reconcile", recorded)


def mirror(cfg: DictConfig, how: How | None = None) -> Mirrored:
    """Copy ``models:/<name>@champion``'s bundle and manifest under ``v<N>-<digest>/``, verify them, then write the
    pointer; under the model's lease, after completing a move of @champion made outside the pipeline. ``how`` says
    how @champion moved: the webhook receiver passes ``ui`` for a delivery and ``reconcile`` for its timer; None:
    ``ui`` when this call completed a move made outside the pipeline, else ``reconcile``."""
    storage = open_storage(cfg.storage)
    with model_lease(cfg, storage, "mirror") as (lease, client):
        recorded = record_champion(client, cfg.registry.model_name, served_version(storage, cfg))
        return publish(cfg, storage, lease, client, how or ("ui" if recorded else "reconcile"), recorded)


def promotion_history(cfg: DictConfig) -> list[history.Entry]:
    """The model's promotion history in storage, newest first."""
    return history.entries(open_storage(cfg.storage), root_key(cfg))
