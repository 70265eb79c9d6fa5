"""The Lambda's configuration, and the two errors that the handler turns into responses.

It has no Hydra: environment variables are its config, with every default here.

- ``MODEL_URI``: the model's root, the prefix or folder that holds ``champion.json``
  (``s3://bucket/models/<name>`` or a local path). Unset: ``s3://$S3_BUCKET/$MODEL_PREFIX``.
- ``S3_BUCKET`` and ``MODEL_PREFIX``: the model's root in S3, both required without ``MODEL_URI``. MODEL_PREFIX has
  no default: it is ``<storage.model_prefix>/<registry.model_name>`` of the pipeline's conf/, whose one home is
  there (``models/distilbert-agnews`` as conf/ ships).
- ``AWS_REGION`` (set by the Lambda runtime) and ``S3_ENDPOINT_URL`` (MinIO, moto; unset: AWS).
- ``MODEL_REFRESH_SECONDS`` (60): with a model loaded, re-read ``champion.json`` at most this often; 0 re-reads it on
  every call.
- ``MODEL_RETRY_SECONDS`` (10): with no model loaded, try to load one at most this often; the requests in between
  get a 503 from memory, so that a broken or unreachable store costs one download per interval, not one per
  request. 0 tries on every call.
- ``MAX_TEXT_CHARS`` (200000): the longest text accepted, in characters.
- ``MAX_BATCH`` (64): the most texts in one ``{"texts": [...]}`` request.
- ``MODEL_CACHE_DIR`` (``/tmp/models``): the root of the download cache. Each store (each ``MODEL_URI``, local paths
  made absolute) has its own folder below it, named by the first 12 hex digits of the URI's sha256, with one folder
  per version and manifest digest in it: ``/tmp/models/<key>/<version>-<manifest sha256[:12]>/``. Two checkouts or
  two functions on one machine never share one.

- ``CAPTURE_RATE`` (1.0): the share of texts answered whose capture record the request's line carries, drawn at
  random per text (bundle/capture.py); 0 keeps none.
- ``CAPTURE_TEXT`` (false): ``true`` puts each captured text itself in its record; otherwise a record holds the
  text's sha256 and never the text.
- ``LOG_LEVEL`` (INFO): of the other log lines (a model's load, errors); the request's own line is always written.
  The metrics' namespace is the template's (``MetricsNamespace``): its metric filters make them of the line.

Standard library only, so that the handler's event parsing runs without the model's dependencies.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

DEFAULTS = {
    "MODEL_REFRESH_SECONDS": "60",
    "MODEL_RETRY_SECONDS": "10",
    "MAX_TEXT_CHARS": "200000",
    "MAX_BATCH": "64",
    "MODEL_CACHE_DIR": "/tmp/models",
    "CAPTURE_RATE": "1.0",
    "CAPTURE_TEXT": "false",
}
BOOLEANS = {"true": True, "false": False}
NO_MODEL = (
    "no model configured: set MODEL_URI, or S3_BUCKET and MODEL_PREFIX "
    "(<storage.model_prefix>/<registry.model_name>, e.g. models/distilbert-agnews)"
)
LOGGER = "agnews"
CACHE_KEY_DIGITS = 12
Number = TypeVar("Number", int, float)


class SettingsError(ValueError):
    """An environment variable with a value the Lambda cannot use (a 500). The pipeline's ``ConfigError``
    (agnews/errors.py) is another thing: a Hydra key, reported by a step's command line."""


class NoModelError(Exception):
    """No servable model (a 503). The pipeline's ``ModelError`` (agnews/errors.py) is another thing: a base model
    that training cannot load.

    ``reason`` is what callers get: short, and never a bucket, key, path or digest. ``detail`` is what the log gets:
    exactly what failed, and where.
    """

    def __init__(self, reason: str, detail: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail or reason


def _number(env: Mapping[str, str], name: str, kind: type[Number], minimum: float) -> Number:
    raw = env.get(name) or DEFAULTS[name]
    try:
        value = kind(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a number") from None
    if value < minimum:
        raise SettingsError(f"{name}={raw!r} must be at least {minimum}")
    return value


def _rate(env: Mapping[str, str], name: str) -> float:
    rate = _number(env, name, float, 0)
    if not rate <= 1:  # NaN too
        raise SettingsError(f"{name}={env.get(name)!r} must be between 0 and 1")
    return rate


def canonical_uri(model_uri: str) -> str:
    """The store that ``model_uri`` names, one spelling per store: ``s3://bucket/prefix`` without a trailing slash,
    or an absolute, resolved local path."""
    if model_uri.startswith("s3://"):
        return model_uri.rstrip("/")
    return str(Path(model_uri.removeprefix("file://")).expanduser().resolve())


def cache_key(model_uri: str) -> str:
    """The name of the store's folder in the download cache."""
    return hashlib.sha256(canonical_uri(model_uri).encode()).hexdigest()[:CACHE_KEY_DIGITS]


def _flag(env: Mapping[str, str], name: str) -> bool:
    raw = env.get(name) or DEFAULTS[name]
    if raw.lower() not in BOOLEANS:
        raise SettingsError(f"{name}={raw!r} must be true or false")
    return BOOLEANS[raw.lower()]


@dataclass(frozen=True)
class Settings:
    """What the handler needs to know, read once per container."""

    model_uri: str | None  # None: no model configured (NO_MODEL says what to set)
    region: str | None
    endpoint_url: str | None
    refresh_seconds: float
    retry_seconds: float
    max_text_chars: int
    max_batch: int
    cache_root: Path
    capture_rate: float
    capture_text: bool

    @property
    def cache_dir(self) -> Path:
        """This store's folder of the download cache: one folder per version in it."""
        return self.cache_root / cache_key(self.model_uri) if self.model_uri else self.cache_root

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Settings:
        """Read the variables above; a bad value raises SettingsError naming it."""
        bucket = env.get("S3_BUCKET")
        prefix = (env.get("MODEL_PREFIX") or "").strip("/")
        return cls(
            model_uri=env.get("MODEL_URI") or (f"s3://{bucket}/{prefix}" if bucket and prefix else None),
            region=env.get("AWS_REGION") or None,
            endpoint_url=env.get("S3_ENDPOINT_URL") or None,
            refresh_seconds=_number(env, "MODEL_REFRESH_SECONDS", float, 0),
            retry_seconds=_number(env, "MODEL_RETRY_SECONDS", float, 0),
            max_text_chars=_number(env, "MAX_TEXT_CHARS", int, 1),
            max_batch=_number(env, "MAX_BATCH", int, 1),
            cache_root=Path(env.get("MODEL_CACHE_DIR") or DEFAULTS["MODEL_CACHE_DIR"]),
            capture_rate=_rate(env, "CAPTURE_RATE"),
            capture_text=_flag(env, "CAPTURE_TEXT"),
        )
