"""The URIs of the stores that the steps open: a tracking store (``tracking.uri``), Optuna's study storage
(``tune.storage``) and a tracking server's database (``steps.webhook unregister --backend-store-uri``).

A URI that cannot name one is refused as malformed, and a database that does not answer is named, each in one line
without the URI's credentials.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import sqlalchemy
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError

from agnews.config import redact, split_userinfo
from agnews.errors import ConfigError

SERVERS = ("http", "https")  # a tracking server's URI; every other scheme with '://' names a database
FOLDERS = ("", "file")  # MLflow's file store: a folder
DIALECTS_WITH_TIMEOUT = ("postgresql", "mysql")  # their drivers take connect_timeout (seconds)


def malformed(key: str, uri: str, why: str) -> ConfigError:
    return ConfigError(f"{key}={redact(uri)}: malformed URI: {why}")


def database_url(key: str, uri: str, stores: str = "") -> URL:
    """The SQLAlchemy URL of the database that ``uri`` names (``key`` says where it was given).

    Raises ConfigError, ``malformed URI``, for a port that is not a number, a scheme that no database has (nor
    ``stores``, which says what else the key takes), or a raw ``@`` in the password: SQLAlchemy ends the password at
    the first ``@``, and would take the rest for the host, and show it, so it must be written ``%40``.
    """
    rest, userinfo = split_userinfo(uri)
    scheme = checked_scheme(key, uri, rest)
    if userinfo and "@" in userinfo:
        raise malformed(key, uri, "the password holds a raw '@': write it as %40")
    try:
        url = make_url(uri)
    except ArgumentError:
        raise malformed(key, uri, "it is not of the form scheme://[user[:password]@]host[:port]/database") from None
    try:
        url.get_dialect()
    except NoSuchModuleError:
        raise malformed(key, uri, f"no database{stores} has the scheme '{scheme}'") from None
    return url


def checked_scheme(key: str, uri: str, without_userinfo: str) -> str:
    """The scheme of ``uri`` (given ``without_userinfo``), once its port, if any, is a number."""
    parts = urlsplit(without_userinfo)
    try:
        parts.port  # noqa: B018 (urllib checks the port when it is read)
    except ValueError:
        raise malformed(key, uri, "the port is not a number from 0 to 65535") from None
    return parts.scheme


def tracking_store(uri: str) -> URL | None:
    """The SQLAlchemy URL of the database that ``tracking.uri`` names, or None for a tracking server or a folder;
    a malformed URI raises ConfigError (``database_url``)."""
    rest = split_userinfo(uri)[0]
    if checked_scheme("tracking.uri", uri, rest) in (*SERVERS, *FOLDERS):
        return None
    return database_url("tracking.uri", uri, stores=" or tracking server (http, https)")


def reason(exc: BaseException) -> str:
    """A driver's error as one line: its type and first line, URIs redacted."""
    lines = str(exc).strip().splitlines()
    return redact(f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__)


def unreachable(url: URL, timeout_s: float) -> str | None:
    """Why the database at ``url`` cannot be connected to within ``timeout_s`` (``reason``), or None when it can."""
    arguments = {"connect_timeout": max(1, round(timeout_s))} if url.get_backend_name() in DIALECTS_WITH_TIMEOUT else {}
    try:
        engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.NullPool, connect_args=arguments)
    except (SQLAlchemyError, ImportError) as exc:  # no driver installed
        return reason(exc)
    try:
        with engine.connect():
            return None
    except SQLAlchemyError as exc:
        return reason(exc)
    finally:
        engine.dispose()
