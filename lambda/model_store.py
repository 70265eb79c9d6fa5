"""The champion model, loaded from the mirror layout in S3 or a folder, verified, cached and swapped when promoted.

Layout under the model's root: ``champion.json`` = {"version", "manifest": "v<N>/manifest.json",
"manifest_sha256", ...} names ``v<N>/manifest.json`` = {"version", "files": {name: {"sha256", "bytes"}}, ...},
which lists the bundle files beside it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import posixpath
import re
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

from predictor import BUNDLE_FILES, Predictor
from settings import LOGGER, Settings

CHAMPION = "champion.json"
CHUNK = 1024 * 1024
WARMUP_TEXT = "warm-up"
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")

log = logging.getLogger(LOGGER)


class ModelError(Exception):
    """No servable model; the message says why."""


class Source(Protocol):
    """Read-only access to the keys below the model's root."""

    def url(self, key: str) -> str: ...
    def open(self, key: str) -> contextlib.AbstractContextManager[IO[bytes]]: ...


class LocalSource:
    """The model's root as a local folder."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def url(self, key: str) -> str:
        return str(self.root / key)

    @contextlib.contextmanager
    def open(self, key: str) -> Iterator[IO[bytes]]:
        try:
            stream = (self.root / key).open("rb")
        except OSError as exc:
            raise ModelError(f"cannot read {self.url(key)}: {exc.strerror}") from None
        with stream:
            yield stream


class S3Source:
    """The model's root as an S3 prefix; the handler's role needs only s3:GetObject on it."""

    def __init__(self, bucket: str, prefix: str, settings: Settings) -> None:
        import boto3  # only S3 roots pay for importing boto3

        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.client = boto3.client("s3", region_name=settings.region, endpoint_url=settings.endpoint_url)

    def url(self, key: str) -> str:
        return f"s3://{self.bucket}/{posixpath.join(self.prefix, key)}"

    @contextlib.contextmanager
    def open(self, key: str) -> Iterator[IO[bytes]]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            body = self.client.get_object(Bucket=self.bucket, Key=posixpath.join(self.prefix, key))["Body"]
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "error")
            raise ModelError(f"cannot read {self.url(key)}: {code} (missing, or not readable by this role)") from None
        except BotoCoreError as exc:
            raise ModelError(f"cannot read {self.url(key)}: {exc}") from None
        with contextlib.closing(body):
            yield body


def open_source(settings: Settings) -> Source:
    """The source named by the settings, or a ModelError when none is configured."""
    if not settings.model_uri:
        raise ModelError("no model configured: set MODEL_URI, or S3_BUCKET (and MODEL_PREFIX)")
    if settings.model_uri.startswith("s3://"):
        bucket, _, prefix = settings.model_uri.removeprefix("s3://").partition("/")
        return S3Source(bucket, prefix, settings)
    return LocalSource(Path(settings.model_uri.removeprefix("file://")).expanduser())


def _read_json(source: Source, key: str) -> tuple[dict[str, Any], str]:
    """The JSON object stored at ``key`` and the sha256 of its bytes."""
    with source.open(key) as stream:
        data = stream.read()
    try:
        value = json.loads(data)
    except ValueError as exc:
        raise ModelError(f"{source.url(key)} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ModelError(f"{source.url(key)} is not a JSON object")
    return value, hashlib.sha256(data).hexdigest()


def _field(doc: dict[str, Any], name: str, where: str) -> Any:
    if name not in doc:
        raise ModelError(f"{where} lacks {name!r}")
    return doc[name]


def _safe_name(value: object, what: str) -> str:
    """``value`` as a single path component; anything that could leave its folder is refused."""
    name = str(value)
    if not SAFE_NAME.fullmatch(name):
        raise ModelError(f"{what} {name!r} is not a plain file name")
    return name


def _file_sha256(path: Path) -> str | None:
    if not path.is_file():
        return None
    with path.open("rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


def _fetch(source: Source, key: str, target: Path, sha256: str) -> None:
    """Copy ``key`` to ``target`` unless a file with that sha256 is there; a mismatch raises ModelError."""
    if _file_sha256(target) == sha256:
        return
    partial = target.with_name(f".{target.name}.part")
    digest = hashlib.sha256()
    with source.open(key) as stream, partial.open("wb") as out:
        while chunk := stream.read(CHUNK):
            digest.update(chunk)
            out.write(chunk)
    if digest.hexdigest() != sha256:
        partial.unlink()
        raise ModelError(f"{source.url(key)}: sha256 {digest.hexdigest()} does not match the manifest's {sha256}")
    partial.replace(target)


@dataclass(frozen=True)
class LoadedModel:
    """A verified bundle, ready to answer."""

    version: int | str
    predictor: Predictor
    folder: Path


def load_version(source: Source, champion: dict[str, Any], cache_dir: Path) -> LoadedModel:
    """Download (or keep) and verify the files of the version that ``champion`` names, then load them."""
    version = _field(champion, "version", CHAMPION)
    manifest_key = str(_field(champion, "manifest", CHAMPION))
    parts = manifest_key.split("/")
    for part in parts:
        _safe_name(part, "manifest path part")
    manifest, manifest_sha256 = _read_json(source, manifest_key)
    if manifest_sha256 != _field(champion, "manifest_sha256", CHAMPION):
        raise ModelError(f"{source.url(manifest_key)}: sha256 {manifest_sha256} does not match {CHAMPION}")
    if str(manifest.get("version")) != str(version):
        raise ModelError(f"{source.url(manifest_key)} is for version {manifest.get('version')!r}, not {version!r}")
    files = _field(manifest, "files", manifest_key)
    missing = [name for name in BUNDLE_FILES if name not in files]
    if missing:
        raise ModelError(f"{source.url(manifest_key)} lists no {', '.join(missing)}")
    folder = cache_dir / _safe_name(version, "version")
    folder.mkdir(parents=True, exist_ok=True)
    for name, meta in files.items():
        key = "/".join([*parts[:-1], _safe_name(name, "file")])
        _fetch(source, key, folder / name, str(_field(meta, "sha256", f"{manifest_key} files[{name!r}]")))
    predictor = Predictor(folder)
    predictor.predict([WARMUP_TEXT])
    return LoadedModel(version, predictor, folder)


class ModelStore:
    """Holds the model being served; re-reads ``champion.json`` at most every ``refresh_seconds``.

    A refresh runs in the calling request, under a lock. Other requests meanwhile keep the model they hold,
    and a version that fails to load leaves the current one in place.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._source: Source | None = None
        self._current: LoadedModel | None = None
        self._problem = "no model loaded yet"
        self._checked_at = float("-inf")
        self._lock = threading.Lock()

    def _due(self) -> bool:
        return time.monotonic() - self._checked_at >= self.settings.refresh_seconds

    def get(self) -> LoadedModel:
        """The model to answer with, refreshed when due; ModelError with the reason when there is none."""
        if self._current is None or self._due():
            self.refresh()
        current = self._current
        if current is None:
            raise ModelError(self._problem)
        return current

    def refresh(self) -> None:
        """Load the champion if it changed. With a model in place, a refresh under way elsewhere is not waited for."""
        if not self._lock.acquire(blocking=self._current is None):
            return
        try:
            if self._current is not None and not self._due():
                return
            self._checked_at = time.monotonic()
            self._swap_to_champion()
        except Exception as exc:  # the handler must keep answering, whatever went wrong
            self._problem = str(exc) if isinstance(exc, ModelError) else f"{type(exc).__name__}: {exc}"
            if self._current is None:
                log.error("no model to serve: %s", self._problem)
            else:
                log.error("keeping version %s: %s", self._current.version, self._problem)
        finally:
            self._lock.release()

    def _swap_to_champion(self) -> None:
        source = self._source = self._source or open_source(self.settings)
        champion, _ = _read_json(source, CHAMPION)
        old = self._current
        if old is not None and str(old.version) == str(_field(champion, "version", CHAMPION)):
            return
        new = load_version(source, champion, self.settings.cache_dir)
        self._current = new
        log.info("serving version %s from %s", new.version, source.url(CHAMPION))
        if old is not None and old.folder != new.folder:
            shutil.rmtree(old.folder, ignore_errors=True)
