"""The Lambda's configuration, and the two errors that the handler turns into responses.

It has no Hydra: environment variables are its config, with every default here.

- ``MODEL_URI``: the model's root, the prefix or folder that holds ``champion.json``
  (``s3://bucket/models/<name>`` or a local path). Unset: ``s3://$S3_BUCKET/$MODEL_PREFIX``.
- ``S3_BUCKET`` and ``MODEL_PREFIX``: the model's root in S3, both required without ``MODEL_URI``. MODEL_PREFIX has
  no default: it is ``<storage.model_prefix>/<registry.model_name>`` of the pipeline's conf/, whose one home is
  there (``models/distilbert-agnews`` as conf/ ships).
- ``AWS_REGION`` (set by the Lambda runtime) and ``S3_ENDPOINT_URL`` (MinIO, moto; unset: AWS).
- ``MODEL_REFRESH_SECONDS`` (60): re-read ``champion.json`` at most this often; 0 re-reads it on every call.
- ``MAX_TEXT_CHARS`` (200000): the longest text accepted, in characters.
- ``MAX_BATCH`` (64): the most texts in one ``{"texts": [...]}`` request.
- ``MODEL_CACHE_DIR`` (``/tmp/models``): downloaded versions, one folder each.

Standard library only, so that the handler's event parsing runs without the model's dependencies.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

DEFAULTS = {
    "MODEL_REFRESH_SECONDS": "60",
    "MAX_TEXT_CHARS": "200000",
    "MAX_BATCH": "64",
    "MODEL_CACHE_DIR": "/tmp/models",
}
NO_MODEL = (
    "no model configured: set MODEL_URI, or S3_BUCKET and MODEL_PREFIX "
    "(<storage.model_prefix>/<registry.model_name>, e.g. models/distilbert-agnews)"
)
LOGGER = "agnews"


class ConfigError(ValueError):
    """An environment variable with a value the Lambda cannot use (a 500)."""


class ModelError(Exception):
    """No servable model (a 503); the message says why."""


def _number(env: Mapping[str, str], name: str, kind: type[int] | type[float], minimum: float) -> int | float:
    raw = env.get(name) or DEFAULTS[name]
    try:
        value = kind(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number") from None
    if value < minimum:
        raise ConfigError(f"{name}={raw!r} must be at least {minimum}")
    return value


@dataclass(frozen=True)
class Settings:
    """What the handler needs to know, read once per container."""

    model_uri: str | None  # None: no model configured (NO_MODEL says what to set)
    region: str | None
    endpoint_url: str | None
    refresh_seconds: float
    max_text_chars: int
    max_batch: int
    cache_dir: Path

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Settings:
        """Read the variables above; a bad value raises ConfigError naming it."""
        bucket = env.get("S3_BUCKET")
        prefix = (env.get("MODEL_PREFIX") or "").strip("/")
        return cls(
            model_uri=env.get("MODEL_URI") or (f"s3://{bucket}/{prefix}" if bucket and prefix else None),
            region=env.get("AWS_REGION") or None,
            endpoint_url=env.get("S3_ENDPOINT_URL") or None,
            refresh_seconds=_number(env, "MODEL_REFRESH_SECONDS", float, 0),
            max_text_chars=_number(env, "MAX_TEXT_CHARS", int, 1),
            max_batch=_number(env, "MAX_BATCH", int, 1),
            cache_dir=Path(env.get("MODEL_CACHE_DIR") or DEFAULTS["MODEL_CACHE_DIR"]),
        )
