"""The champion model, loaded from the mirror layout in S3 or a folder, verified, cached and swapped when promoted;
and a rollout's candidate beside it.

Layout under the model's root (``bundle.layout`` owns it): ``champion.json`` names ``v<N>-<digest>/manifest.json``
and its sha256 (``<digest>`` is the start of that sha256); the manifest lists the sha256 of every bundle file beside
it. Each version is downloaded to its own folder of the store's cache (``Settings.cache_dir``), and every file is
checked against the manifest before it is loaded. During a rollout, ``champion.json``'s ``candidate`` names a second
version, loaded the same way; a candidate that can't be loaded, or that this reader does not understand, costs no
answer: the champion serves alone, and one log line says why.

A failure is a ``NoModelError`` with a short reason for callers (one of the constants below) and the details, which
name buckets, keys, paths and digests, for the log only.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import itertools
import logging
import os
import posixpath
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Protocol, TypeVar

from settings import LOGGER, NO_MODEL, NoModelError, Settings

from bundle.layout import POINTER, Candidate, ContractError, Pointer, parse_manifest, parse_pointer, sha256

if TYPE_CHECKING:
    from bundle.predictor import Predictor

PREDICTOR = "bundle.predictor"  # onnxruntime, numpy and tokenizers: imported beside the first load's reads

CHUNK = 1024 * 1024
WARMUP_TEXT = "warm-up"
LOAD_PHASES = ("manifest", "fetch", "session", "first_run")  # LoadedModel.load_s
# What a caller is told; the log says which file, where, and why.
UNREADABLE = "the model store could not be read"
UNVERIFIED = "the champion model failed verification"
UNLOADABLE = "the champion model could not be loaded"

log = logging.getLogger(LOGGER)
Document = TypeVar("Document")
Clock = Callable[[], float]


class Source(Protocol):
    """Read-only access to the keys below the model's root."""

    def url(self, key: str) -> str: ...
    def open(self, key: str) -> contextlib.AbstractContextManager[IO[bytes]]: ...


class LocalSource:
    """The model's root as a local folder. A key that resolves outside the folder (through a symlink) is refused."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def url(self, key: str) -> str:
        return str(self.root / key)

    @contextlib.contextmanager
    def open(self, key: str) -> Iterator[IO[bytes]]:
        path = self.root / key
        try:
            if not path.resolve().is_relative_to(self.root.resolve()):
                raise NoModelError(UNVERIFIED, f"{self.url(key)} resolves to {path.resolve()}, outside {self.root}")
            stream = path.open("rb")
        except OSError as exc:
            raise NoModelError(UNREADABLE, f"cannot read {self.url(key)}: {exc.strerror}") from None
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
            detail = f"cannot read {self.url(key)}: {code} (missing, or not readable by this role)"
            raise NoModelError(UNREADABLE, detail) from None
        except BotoCoreError as exc:
            raise NoModelError(UNREADABLE, f"cannot read {self.url(key)}: {exc}") from None
        with contextlib.closing(body):
            yield body


def open_source(settings: Settings) -> Source:
    """The source named by the settings, or a NoModelError when none is configured."""
    if not settings.model_uri:
        raise NoModelError(NO_MODEL)
    if settings.model_uri.startswith("s3://"):
        bucket, _, prefix = settings.model_uri.removeprefix("s3://").partition("/")
        return S3Source(bucket, prefix, settings)
    return LocalSource(Path(settings.model_uri.removeprefix("file://")).expanduser())


def _import_predictor() -> None:
    """Import ``bundle.predictor``; a failure is left for the load, whose own import raises it again."""
    with contextlib.suppress(Exception):
        importlib.import_module(PREDICTOR)


def _read(source: Source, key: str) -> bytes:
    with source.open(key) as stream:
        return stream.read()


def _parse(source: Source, key: str, data: bytes, parse: Callable[[bytes, str], Document]) -> Document:
    """``data``, read from ``key``, parsed by a ``bundle.layout`` reader; a broken contract is a NoModelError whose
    detail names the document's URL."""
    url = source.url(key)
    try:
        return parse(data, url)
    except ContractError as exc:
        message = str(exc)
        raise NoModelError(UNVERIFIED, message if message.startswith(url) else f"{url}: {message}") from None


def _file_sha256(path: Path) -> str | None:
    if not path.is_file():
        return None
    with path.open("rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


def _fetch(source: Source, key: str, target: Path, expected: str) -> None:
    """Copy ``key`` to ``target`` unless a file with that sha256 is there; a mismatch raises NoModelError."""
    if _file_sha256(target) == expected:
        return
    digest = hashlib.sha256()
    # a partial file of its own, so that two processes that share the cache never write into one
    handle, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    partial = Path(name)
    try:
        with os.fdopen(handle, "wb") as out, source.open(key) as stream:
            while chunk := stream.read(CHUNK):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != expected:
            detail = f"{source.url(key)}: sha256 {digest.hexdigest()} does not match the manifest's {expected}"
            raise NoModelError(UNVERIFIED, detail)
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)


@dataclass(frozen=True)
class LoadedModel:
    """A verified bundle, ready to answer: champion.json's model name and version, the digest of the manifest it was
    verified against, and the seconds its load took, phase by phase (``load_version``)."""

    model_name: str
    version: int
    manifest_sha256: str
    predictor: Predictor
    folder: Path
    load_s: dict[str, float]


@dataclass(frozen=True)
class Rollout:
    """A candidate loaded beside the champion: how it meets traffic (``champion.json``'s candidate) and its model."""

    candidate: Candidate
    model: LoadedModel


def load_version(source: Source, pointer: Pointer, cache_dir: Path) -> LoadedModel:
    """Download (or keep) and verify the files of the version that ``pointer`` names, then load them. Its phases:
    the manifest read and checked, the files fetched (downloaded and hashed as they stream), the onnxruntime
    session and tokenizer created (on a first load, with what is left of importing them), and the first run."""
    began = time.perf_counter()
    data = _read(source, pointer.manifest)
    if sha256(data) != pointer.manifest_sha256:
        detail = f"{source.url(pointer.manifest)}: sha256 {sha256(data)} does not match {POINTER}"
        raise NoModelError(UNVERIFIED, detail)
    manifest = _parse(source, pointer.manifest, data, parse_manifest)
    if manifest.version != pointer.version:
        detail = f"{source.url(pointer.manifest)} is for version {manifest.version}, not {pointer.version}"
        raise NoModelError(UNVERIFIED, detail)
    # A folder per version and manifest digest (both checked by parse_pointer): the same version number mirrored
    # again with other bytes is another model, and never overwrites the files of the one being served.
    folder = cache_dir / f"{pointer.version}-{pointer.manifest_sha256[:12]}"
    folder.mkdir(parents=True, exist_ok=True)
    manifest_read = time.perf_counter()
    for name, expected in manifest.files.items():  # names checked by parse_manifest: none leaves the folder
        _fetch(source, posixpath.join(posixpath.dirname(pointer.manifest), name), folder / name, expected)
    fetched = time.perf_counter()
    try:
        from bundle.predictor import Predictor  # waits for the import that _swap_to_champion started, if under way

        predictor = Predictor(folder)
        created = time.perf_counter()
        predictor.predict([WARMUP_TEXT])
    except Exception as exc:  # verified files that onnxruntime or tokenizers still refuse
        raise NoModelError(UNLOADABLE, f"version {pointer.version} in {folder}: {type(exc).__name__}: {exc}") from exc
    marks = (began, manifest_read, fetched, created, time.perf_counter())
    load_s = {name: end - start for name, (start, end) in zip(LOAD_PHASES, itertools.pairwise(marks), strict=True)}
    return LoadedModel(pointer.model_name, pointer.version, pointer.manifest_sha256, predictor, folder, load_s)


class ModelStore:
    """Holds the model being served.

    With a model, it re-reads ``champion.json`` at most every ``refresh_seconds``; without one, it tries to load one
    at most every ``retry_seconds``, and answers the requests in between from memory with the last failure. A load
    runs in the calling request, under a lock. Other requests meanwhile keep the model they hold, and a version that
    fails to load leaves the current one in place. ``source`` and ``clock`` default to the settings' source and
    ``time.monotonic``.
    """

    def __init__(self, settings: Settings, source: Source | None = None, clock: Clock = time.monotonic) -> None:
        self.settings = settings
        self._source = source
        self._clock = clock
        self._current: LoadedModel | None = None
        self._rollout: Rollout | None = None
        self._refused: str | None = None  # the candidate last refused, so that its log line is written once
        self._problem = NoModelError(UNLOADABLE, "no model loaded yet")
        self._checked_at = float("-inf")
        self._lock = threading.Lock()

    def _due(self) -> bool:
        interval = self.settings.refresh_seconds if self._current is not None else self.settings.retry_seconds
        return self._clock() - self._checked_at >= interval

    def get(self) -> LoadedModel:
        """The model to answer with, refreshed when due; NoModelError with the reason when there is none. Without a
        model, a request waits for a load under way, and answers with its outcome."""
        if self._current is None or self._due():
            self.refresh()
        current = self._current
        if current is None:
            problem = self._problem
            raise NoModelError(problem.reason, problem.detail)  # a new one: a re-raised one would grow its traceback
        return current

    def rollout(self) -> Rollout | None:
        """The candidate to serve beside the model that ``get`` returned, if a rollout is under way."""
        return self._rollout

    def refresh(self) -> None:
        """Load the champion if it changed. With a model in place, a refresh under way elsewhere is not waited for;
        without one, a request waits for it, then answers with its outcome."""
        if not self._lock.acquire(blocking=self._current is None):
            return
        try:
            if not self._due():  # another request has just tried
                return
            self._checked_at = self._clock()
            self._swap_to_champion()
        except Exception as exc:  # the handler must keep answering, whatever went wrong
            problem = exc if isinstance(exc, NoModelError) else NoModelError(UNLOADABLE, f"{type(exc).__name__}: {exc}")
            self._problem = problem
            if self._current is None:
                log.error("no model to serve: %s", problem.detail)
            else:
                log.error("keeping version %s: %s", self._current.version, problem.detail)
        finally:
            self._lock.release()

    def recheck(self) -> None:
        """Re-read ``champion.json`` now, however recently it was read (SnapStart's restore: the snapshot may be
        hours old); a refresh under way elsewhere is not waited for, as in ``refresh``."""
        self._checked_at = float("-inf")
        self.refresh()

    def _swap_to_champion(self) -> None:
        if PREDICTOR not in sys.modules:
            # The first load imports the model's libraries on a thread of their own while this one imports boto3 and
            # reads the store: a cold start waits for the longer of the two, not for both (the reads wait on the
            # network, and Lambda's init phase may run on more than one CPU).
            threading.Thread(target=_import_predictor, daemon=True).start()
        source = self._source = self._source or open_source(self.settings)
        pointer = _parse(source, POINTER, _read(source, POINTER), parse_pointer)
        old, rollout = self._current, self._rollout
        # The manifest's digest, not only the version: the same version number mirrored again with other bytes (a
        # second registry's v1 in a shared bucket) is another model.
        if old is None or old.manifest_sha256 != pointer.manifest_sha256:
            if rollout is not None and rollout.model.manifest_sha256 == pointer.manifest_sha256:
                new = rollout.model  # a promoted candidate: loaded already
            else:
                new = load_version(source, pointer, self.settings.cache_dir)
            self._current = new
            log.info("serving version %s from %s", new.version, source.url(POINTER), extra={"load_s": new.load_s})
        self._rollout = self._load_candidate(source, pointer)
        kept = {loaded.folder for loaded in (self._current, self._rollout.model if self._rollout else None) if loaded}
        for loaded in (old, rollout.model if rollout else None):
            if loaded is not None and loaded.folder not in kept:
                shutil.rmtree(loaded.folder, ignore_errors=True)

    def _load_candidate(self, source: Source, pointer: Pointer) -> Rollout | None:
        """The candidate that ``pointer`` names, loaded (or kept) beside the champion; None when there is none, or
        it can't be served (one log line says why, once per candidate)."""
        candidate, current = pointer.candidate, self._rollout
        if candidate is None:
            if pointer.refused is not None and pointer.refused != self._refused:
                log.error("serving version %s alone: %s", pointer.version, pointer.refused)
            self._refused = pointer.refused
            return None
        if current is not None and current.model.manifest_sha256 == candidate.manifest_sha256:
            return Rollout(candidate, current.model)  # its mode or weight may have changed
        try:
            as_pointer = Pointer(pointer.model_name, candidate.version, candidate.manifest, candidate.manifest_sha256)
            model = load_version(source, as_pointer, self.settings.cache_dir)
        except NoModelError as exc:
            log.error("serving version %s alone: candidate %s: %s", pointer.version, candidate.version, exc.detail)
            return None
        log.info("candidate version %s beside %s: %s", candidate.version, pointer.version, candidate.mode)
        return Rollout(candidate, model)
