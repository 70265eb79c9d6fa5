"""Publishing: copy @champion's serving bundle to storage, verify it, and only then move the pointer.

Layout under ``<storage.model_prefix>/<registry.model_name>/`` (``bundle.layout``): ``v<N>/`` holds the bundle
files and ``manifest.json``; ``champion.json`` names the manifest of the version to serve. The pointer is written
last, after every file has been read back and checked, so it always names a complete version. Files already in
place are not written again: a re-run changes nothing.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig

from agnews.errors import NotFoundError, RegistryError, StorageError
from agnews.pyfunc import BUNDLE_PATH
from agnews.registry import CHAMPION, aliases
from agnews.storage import Storage, open_storage
from bundle.layout import (
    POINTER,
    ContractError,
    digest,
    manifest_bytes,
    manifest_key,
    parse_pointer,
    pointer_bytes,
    version_folder,
)

MANIFEST_METRICS = ("test_accuracy", "test_f1_macro", "onnx_int8_accuracy", "onnx_int8_agreement")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Mirrored:
    """The version that the pointer names, where the pointer is, and whether this call wrote anything."""

    version: int
    pointer: str
    changed: bool

    def tags(self) -> dict[str, str]:
        return {
            "mirror.version": str(self.version),
            "mirror.pointer": self.pointer,
            "mirror.changed": str(self.changed).lower(),
        }


def stored_digest(storage: Storage, key: str) -> dict[str, str | int] | None:
    """sha256 and size of the object as read back from storage; None when it is absent."""
    return digest(storage.read_bytes(key)) if storage.exists(key) else None


def put_verified(storage: Storage, key: str, data: bytes) -> bool:
    """Write ``data`` unless storage already holds exactly it, then read it back; True when it was written."""
    expected = digest(data)
    if stored_digest(storage, key) == expected:
        return False
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
    """Write the pointer to ``v<version>/manifest.json`` unless it already names it; True when it was written."""
    pointer = read_pointer(storage, key)
    if pointer == {"version": version, "manifest_sha256": digest(manifest)["sha256"]}:
        log.info("%s already names %s v%s: nothing to do", storage.url(key), name, version)
        return False
    updated = datetime.now(UTC).isoformat(timespec="seconds")
    storage.write_bytes(key, pointer_bytes(name, version, manifest, updated))
    log.info("%s now names %s v%s (it named %s)", storage.url(key), name, version, pointer.get("version", "nothing"))
    return True


def model_root(cfg: DictConfig) -> str:
    """The URL of the folder that holds ``champion.json``: the Lambda's MODEL_URI."""
    return open_storage(cfg).url(f"{cfg.storage.model_prefix}/{cfg.registry.model_name}")


def mirror(cfg: DictConfig) -> Mirrored:
    """Copy ``models:/<name>@champion``'s bundle and manifest under ``v<N>/``, verify them, then write the pointer."""
    client = MlflowClient()
    name = cfg.registry.model_name
    number = aliases(client, name).get(CHAMPION)
    if number is None:
        raise RegistryError(f"model '{name}' has no @{CHAMPION}: run the register step first")
    files = download_bundle(name, number)
    manifest_doc = manifest(client, client.get_model_version(name, number), files)
    storage = open_storage(cfg)
    root = f"{cfg.storage.model_prefix}/{name}"
    objects = {f"{root}/{version_folder(number)}/{file}": data for file, data in files.items()}
    objects[f"{root}/{manifest_key(number)}"] = manifest_doc
    written = [key for key, data in objects.items() if put_verified(storage, key, data)]
    moved = point_to(storage, f"{root}/{POINTER}", name, number, manifest_doc)
    return Mirrored(number, storage.url(f"{root}/{POINTER}"), bool(written) or moved)
