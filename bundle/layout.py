"""The serving bundle's files, its ``config.json``, and the mirror's ``manifest.json`` and ``champion.json``.

A bundle is a folder of ``model.int8.onnx``, ``tokenizer.json`` and ``config.json``. The mirror lays each
registered version out as ``v<N>-<digest>/`` (the bundle plus ``manifest.json``: version, run, metrics, and the sha256
and size of every file; ``<digest>`` is the start of the manifest's own sha256) below a model's root, and
``champion.json`` there names the manifest of the version to serve and, during a rollout, the candidate's. A
folder's name fixes its bytes: two registries that share a bucket, each with its own v1, write two folders, and no
file is ever replaced by other bytes.
Writers build these documents with the functions below, readers parse them with ``parse_*``, which refuse any
field of the wrong type with a ``ContractError``.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from typing import Any

ONNX_FILE = "model.int8.onnx"
TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "config.json"
BUNDLE_FILES = (ONNX_FILE, TOKENIZER_FILE, CONFIG_FILE)
INPUTS = ("input_ids", "attention_mask")
OUTPUT = "logits"
MANIFEST = "manifest.json"
POINTER = "champion.json"
# The version's reference profile (the model's answers on its validation split), which the mirror puts beside the
# bundle with its digest in the manifest for the monitoring step; not a bundle file: the Lambda never fetches it.
REFERENCE = "reference.parquet"

SHA256 = re.compile(r"[0-9a-f]{64}")
# Hex digits of the manifest's sha256 in a version's folder name: 48 bits, so two different manifests of one version
# number get the same folder only by a collision that no registry will meet.
DIGEST_CHARS = 12
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class ContractError(ValueError):
    """A bundle document that breaks the contract; the message names the document and the field."""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def digest(data: bytes) -> dict[str, str | int]:
    """What a manifest records of a file: its sha256 and size."""
    return {"sha256": sha256(data), "bytes": len(data)}


def to_json(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, indent=2).encode()


def version_folder(version: int, manifest_sha256: str) -> str:
    """``v<N>-<first DIGEST_CHARS hex digits of the manifest's sha256>``, the folder the mirror writes."""
    if not SHA256.fullmatch(manifest_sha256):
        raise ContractError(f"{manifest_sha256!r} is not a sha256 hex digest")
    return f"v{version}-{manifest_sha256[:DIGEST_CHARS]}"


def manifest_key(version: int, manifest_sha256: str) -> str:
    """The manifest's key below the model's root (see ``version_folder``)."""
    return f"{version_folder(version, manifest_sha256)}/{MANIFEST}"


def _object(data: bytes, where: str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except ValueError as exc:
        raise ContractError(f"{where} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ContractError(f"{where} is not a JSON object")
    return value


def _field(doc: dict[str, Any], name: str, kind: type | tuple[type, ...], where: str) -> Any:
    if name not in doc:
        raise ContractError(f"{where} lacks {name!r}")
    value = doc[name]
    # bool is an int in Python, never in these documents
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise ContractError(f"{where}: {name!r} must not be a boolean")
    if not isinstance(value, kind):
        raise ContractError(f"{where}: {name!r} is {type(value).__name__}, not {getattr(kind, '__name__', kind)}")
    return value


def _version(doc: dict[str, Any], where: str) -> int:
    version = _field(doc, "version", int, where)
    if version < 1:
        raise ContractError(f"{where}: 'version' {version} is not a version number")
    return version


def _sha(doc: dict[str, Any], name: str, where: str) -> str:
    value = _field(doc, name, str, where)
    if not SHA256.fullmatch(value):
        raise ContractError(f"{where}: {name!r} is not a sha256 hex digest")
    return value


def safe_name(value: str, what: str) -> str:
    """``value`` as a single path component; anything that could leave its folder is refused."""
    if not SAFE_NAME.fullmatch(value):
        raise ContractError(f"{what} {value!r} is not a plain file name")
    return value


@dataclass(frozen=True)
class BundleConfig:
    """``config.json``: the labels in logit order, the tokenizer's truncation and padding, texts per ONNX call."""

    labels: list[str]
    max_length: int
    batch_size: int
    pad_token: str

    def to_bytes(self) -> bytes:
        return to_json(asdict(self))


def parse_config(data: bytes, where: str = CONFIG_FILE) -> BundleConfig:
    doc = _object(data, where)
    labels = _field(doc, "labels", list, where)
    if not labels or not all(isinstance(label, str) for label in labels):
        raise ContractError(f"{where}: 'labels' must be a non-empty list of strings")
    return BundleConfig(
        labels=labels,
        max_length=_field(doc, "max_length", int, where),
        batch_size=_field(doc, "batch_size", int, where),
        pad_token=_field(doc, "pad_token", str, where),
    )


@dataclass(frozen=True)
class Manifest:
    """``v<N>-<digest>/manifest.json``: the version and the sha256 of each file beside it."""

    version: int
    files: dict[str, str]
    reference: str | None = None  # the sha256 of REFERENCE beside the bundle, where the version has one


def manifest_bytes(
    model_name: str,
    version: int,
    run_id: str | None,
    metrics: dict[str, float],
    files: dict[str, bytes],
    created_at: str,
    reference: bytes | None = None,
) -> bytes:
    """The manifest of a version's ``files``, and of its ``reference`` profile where it has one (a manifest without
    one has no ``reference`` key: the manifests of versions without a profile are unchanged)."""
    doc: dict[str, Any] = {
        "model_name": model_name,
        "version": version,
        "run_id": run_id,
        "metrics": metrics,
        "files": {name: digest(data) for name, data in files.items()},
    }
    if reference is not None:
        doc["reference"] = digest(reference)
    return to_json(doc | {"created_at": created_at})


def parse_manifest(data: bytes, where: str = MANIFEST) -> Manifest:
    doc = _object(data, where)
    files = _field(doc, "files", dict, where)
    missing = [name for name in BUNDLE_FILES if name not in files]
    if missing:
        raise ContractError(f"{where} lists no {', '.join(missing)}")
    hashes = {}
    for name, meta in files.items():
        entry = f"{where} files[{name!r}]"
        if not isinstance(meta, dict):
            raise ContractError(f"{entry} is not a JSON object")
        hashes[safe_name(name, "file")] = _sha(meta, "sha256", entry)
    reference = (
        _sha(_field(doc, "reference", dict, where), "sha256", f"{where} reference") if "reference" in doc else None
    )
    return Manifest(_version(doc, where), hashes, reference)


MODES = ("shadow", "canary")  # how a candidate meets live traffic
CANDIDATE_FIELDS = frozenset({"version", "manifest", "manifest_sha256", "mode", "weight", "rollout"})


@dataclass(frozen=True)
class Candidate:
    """``champion.json``'s ``candidate``: a version meeting live traffic beside the champion. ``shadow``: it also
    runs on every text, and only the champion answers; ``canary``: it answers ``weight`` of the texts, chosen by a
    stable hash of the text's sha256 and ``rollout``, the rollout's id."""

    version: int
    manifest: str
    manifest_sha256: str
    mode: str
    weight: float
    rollout: str

    def to_doc(self) -> dict[str, Any]:
        return asdict(self)

    def answers(self, text_sha256: str) -> bool:
        """Whether the candidate answers the text with this sha256 (hex): a canary does for ``weight`` of the texts,
        by a stable hash of the text's digest and the rollout's id, so that a text gets the same version on every
        request of one rollout, and another share in the next; a shadow answers none."""
        if self.mode != "canary":
            return False
        draw = hashlib.sha256(f"{self.rollout}:{text_sha256}".encode()).digest()
        return int.from_bytes(draw[:8], "big") < self.weight * 2**64


@dataclass(frozen=True)
class Pointer:
    """``champion.json``: the version to serve and the key and sha256 of its manifest; the candidate, where a rollout
    is under way. ``refused`` says why a ``candidate`` the reader does not understand (a newer field, an unknown
    mode) was left out: the champion is still served."""

    model_name: str
    version: int
    manifest: str
    manifest_sha256: str
    candidate: Candidate | None = None
    refused: str | None = None


def candidate_for(version: int, manifest: bytes, mode: str, weight: float, rollout: str) -> Candidate:
    """The candidate that serves ``manifest`` (the version's, in its folder ``v<N>-<digest>/``)."""
    return Candidate(version, manifest_key(version, sha256(manifest)), sha256(manifest), mode, weight, rollout)


def pointer_bytes(
    model_name: str, version: int, manifest: bytes, updated_at: str, candidate: Candidate | None = None
) -> bytes:
    """``champion.json`` naming ``manifest`` in its folder, ``v<N>-<digest>/``, and ``candidate`` where there is one
    (a pointer without one has no ``candidate`` key, as before rollouts)."""
    doc: dict[str, Any] = {
        "model_name": model_name,
        "version": version,
        "manifest": manifest_key(version, sha256(manifest)),
        "manifest_sha256": sha256(manifest),
        "updated_at": updated_at,
    }
    return to_json(doc | ({"candidate": candidate.to_doc()} if candidate is not None else {}))


def _manifest_path(doc: dict[str, Any], where: str) -> str:
    manifest = _field(doc, "manifest", str, where)
    for part in manifest.split("/"):
        safe_name(part, "manifest path part")
    return manifest


def parse_candidate(value: object, where: str) -> Candidate:
    """``champion.json``'s ``candidate``; a ContractError for a field this reader does not know, or a bad value."""
    if not isinstance(value, dict):
        raise ContractError(f"{where} is not a JSON object")
    unknown = sorted(set(value) - CANDIDATE_FIELDS)
    if unknown:
        raise ContractError(f"{where} has fields this reader does not know: {', '.join(unknown)}")
    mode = _field(value, "mode", str, where)
    if mode not in MODES:
        raise ContractError(f"{where}: 'mode' {mode!r} is not one of {', '.join(MODES)}")
    weight = _field(value, "weight", (int, float), where)
    if not 0 <= weight <= 1:  # NaN too
        raise ContractError(f"{where}: 'weight' {weight} is not in [0, 1]")
    return Candidate(
        version=_version(value, where),
        manifest=_manifest_path(value, where),
        manifest_sha256=_sha(value, "manifest_sha256", where),
        mode=mode,
        weight=float(weight),
        rollout=safe_name(_field(value, "rollout", str, where), "rollout id"),
    )


def parse_pointer(data: bytes, where: str = POINTER) -> Pointer:
    """``champion.json``: a ContractError when the champion's fields break the contract; a ``candidate`` that does
    (or that this reader does not understand) is left out, and ``refused`` says why."""
    doc = _object(data, where)
    candidate, refused = None, None
    if "candidate" in doc:
        try:
            candidate = parse_candidate(doc["candidate"], f"{where} candidate")
        except ContractError as exc:
            refused = str(exc)
    return Pointer(
        model_name=_field(doc, "model_name", str, where),
        version=_version(doc, where),
        manifest=_manifest_path(doc, where),
        manifest_sha256=_sha(doc, "manifest_sha256", where),
        candidate=candidate,
        refused=refused,
    )
