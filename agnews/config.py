"""Hydra plumbing shared by the entry points: resolvers, argv handling, config logging."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib.resources
import json
import logging
import os
import re
import shlex
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, ParamSpec
from urllib.parse import unquote, urlsplit

import hydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from agnews.errors import ConfigError, PipelineError
from agnews.settings import Settings, one_line, validate

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = PROJECT_ROOT / "conf"

log = logging.getLogger(__name__)


def _storage_uri(bucket: str | None, local_dir: str) -> str:
    return f"s3://{bucket}" if bucket else local_dir


def _package_dir(package: str, subdir: str) -> str:
    return str(importlib.resources.files(package) / subdir)


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", Path(name).name.lower()).strip("-")


_RESOLVERS: dict[str, Callable[..., str]] = {
    "project_root": lambda: str(PROJECT_ROOT),
    "storage_uri": _storage_uri,
    "package_dir": _package_dir,
    "slug": _slug,
}
for _name, _fn in _RESOLVERS.items():
    OmegaConf.register_new_resolver(_name, _fn, replace=True)


# A Hydra override: `key=value`, `+key=value`, `++key=value`, `~key` or `~key=value`.
_OVERRIDE = re.compile(r"(\+{1,2})?[\w.@/-]+=.*|~[\w.@/-]+(=.*)?", re.DOTALL)


def _split(arg: str) -> list[str]:
    """Shell-split ``arg`` when every piece is an override; otherwise keep it whole (a value with spaces)."""
    try:
        pieces = shlex.split(arg)
    except ValueError:
        return [arg]
    return pieces if all(_OVERRIDE.fullmatch(p) for p in pieces) else [arg]


@functools.cache
def mlproject_keys() -> frozenset[str]:
    """The keys that MLproject's entry points pass as ``key={parameter}``, which arrive as ``key=`` when the parameter
    is left at its empty default; every key where there is no MLproject file."""
    try:
        project = (PROJECT_ROOT / "MLproject").read_text()
    except OSError:
        return frozenset({"*"})
    return frozenset(re.findall(r"([\w.]+)=\{\w+\}", project))  # only the commands hold `{parameter}`


def split_overrides(args: list[str]) -> list[str]:
    """Split arguments that carry several Hydra overrides, as one MLproject parameter does.

    ``"data.sample_size=1000 train.epochs=1"`` becomes two overrides; ``"data.source=/a folder"`` stays one.
    An override of an MLproject parameter's key with nothing after ``=`` (the parameter left at its empty default)
    is dropped; any other blank value stays, for its key's schema to judge (``tune.storage=`` is refused).
    """
    overrides = [piece for arg in args for piece in _split(arg)]
    keys = mlproject_keys()
    return [o for o in overrides if not (o.endswith("=") and ("*" in keys or o[:-1].lstrip("+") in keys))]


def _compose(overrides: list[str]) -> DictConfig:  # composition itself: the one place a DictConfig lives
    """Hydra's compose; what it refuses is one ConfigError line, naming the key for a value of the wrong type
    (``train.epochs=abc``)."""
    with hydra.initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        try:
            return hydra.compose(config_name="config", overrides=overrides)
        except HydraException as exc:
            cause = exc.__cause__
            message = one_line(cause) if isinstance(cause, OmegaConfBaseException) else str(exc).splitlines()[0]
            raise ConfigError(message) from None


def _dotted_keys(node: Any, prefix: str = "") -> list[str]:
    if not isinstance(node, dict):
        return []
    return [
        key for name, value in node.items() for key in (f"{prefix}{name}", *_dotted_keys(value, f"{prefix}{name}."))
    ]


def _closest(word: str, choices: list[str]) -> str:
    match = difflib.get_close_matches(word, choices, n=1)
    return f"; did you mean '{match[0]}'?" if match else ""


@functools.cache
def _config_keys(chosen: tuple[str, ...]) -> list[str]:
    """Every dotted key of the config composed with these group options: the same for each override that chooses
    them, so composed once per choice (most commands choose none)."""
    return _dotted_keys(OmegaConf.to_container(_compose(list(chosen)), resolve=False))


def check_overrides(overrides: list[str]) -> None:
    """Refuse, in one line that names the closest key or option, an override the config cannot take.

    Hydra answers a misspelled key (``trian.epochs=1``) in six lines, and accepts ``+trian.epochs=1``, with which a
    step would run with the key silently ignored: a ``+`` key is refused unless the config has it (``++``) or it
    names one of the project's config groups. ``hydra.*`` overrides are Hydra's own and pass through.
    """
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as exc:
        raise ConfigError(str(exc).splitlines()[0]) from None
    groups = {path.name: sorted(p.stem for p in path.glob("*.yaml")) for path in CONF_DIR.iterdir() if path.is_dir()}
    chosen = [str(o.input_line) for o in parsed if o.key_or_group in groups and not (o.is_add() or o.is_delete())]
    for override in chosen:
        name, option = override.split("=", 1)
        if option not in (*groups[name], "null"):
            raise ConfigError(
                f"{override}: no such option{_closest(option, groups[name])} (choose from {', '.join(groups[name])})"
            )
    keys = _config_keys(tuple(chosen))
    for o in parsed:
        key = o.key_or_group
        if key.split(".")[0].split("/")[0] == "hydra" or key in groups or key in keys:
            continue
        if o.is_add():
            raise ConfigError(f"{o.input_line}: adds a key that no step reads{_closest(key, keys)}")
        raise ConfigError(f"{o.input_line}: no such key{_closest(key, keys)}")


USERNAME_VARIABLE, PASSWORD_VARIABLE = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"
TRACKING_URI_VARIABLE = "MLFLOW_TRACKING_URI"


def without_credentials(uri: str) -> tuple[str, tuple[str, str] | None]:
    """An HTTP(S) URI without its user info, and the (username, password) that it carried, if any."""
    rest, userinfo = split_userinfo(uri)
    if urlsplit(rest).scheme not in ("http", "https") or userinfo is None:
        return uri, None
    username, _, password = userinfo.partition(":")
    return rest, (unquote(username), unquote(password))


def credentials_out_of_environment() -> None:
    """Credentials in ``MLFLOW_TRACKING_URI`` move to MLflow's ``MLFLOW_TRACKING_USERNAME``/``PASSWORD`` before the
    config reads the variable, so that the config, the run's parameters and every line hold the URI without them
    (a ``tracking.uri`` override keeps them, redacted as ``***``)."""
    uri, credentials = without_credentials(os.environ.get(TRACKING_URI_VARIABLE, ""))
    if credentials:
        os.environ[TRACKING_URI_VARIABLE] = uri
        os.environ[USERNAME_VARIABLE], os.environ[PASSWORD_VARIABLE] = credentials


def compose(overrides: list[str] | None = None) -> Settings:
    """The typed settings, composed as the entry points compose them (for tests and library use); an unknown key, or
    a value out of its key's type or range (agnews/settings.py), fails in one line."""
    credentials_out_of_environment()
    overrides = split_overrides(overrides or [])
    check_overrides(overrides)
    return validate(_compose(overrides))


# The user info of a URI (`scheme://user:password@host`): a tracking server's or a database's credentials. After
# `user:`, the password runs to the last `@` before the next blank, so it may hold an unencoded `@`, `/`, `?` or `#`
# (SQLAlchemy accepts them), unless it is digits up to a `/`, `?`, `#` or the end: that is a port
# (`http://host:5000/path@v1` has no user info). Without a `:`, the user info holds none of `/`, `?` and `#`.
_USERINFO = re.compile(r"\b([A-Za-z][A-Za-z0-9+.-]*://)(?:[^:/?#@\s]*:(?!\d*(?:[/?#\s]|$))\S*|[^/?#\s]+)@")


def redact(text: str) -> str:
    """``text`` with the user info of every URI in it replaced by ``***``: ``http://***@host:5000``.

    What the steps log or record (parameters, ``config.yaml``, log lines) goes through this, so that credentials
    written into a URI (``MLFLOW_TRACKING_URI=http://user:password@host``) never reach a run or a log. A password of
    digits followed by an unencoded ``/`` reads as a port and stays: percent-encode it (``%2F``).
    """
    return _USERINFO.sub(r"\1***@", text)


def split_userinfo(uri: str) -> tuple[str, str | None]:
    """``uri`` without its user info, and the user info (None if it has none), as ``redact`` reads them: the user
    info ends at the last ``@`` before the host, though the password holds an unencoded ``/``, ``#`` or ``?``."""
    match = _USERINFO.match(uri)
    if match is None:
        return uri, None
    scheme = match.group(1)
    return scheme + uri[match.end() :], match.group(0)[len(scheme) : -1]


def _redacted(node: Any) -> Any:
    if isinstance(node, dict):
        return {key: _redacted(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_redacted(value) for value in node]
    return redact(node) if isinstance(node, str) else node


def flatten(settings: Settings) -> dict[str, Any]:
    """Flatten the settings into dotted keys, as MLflow params (URI credentials redacted)."""
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            out[prefix.rstrip(".")] = json.dumps(node) if isinstance(node, list) else node

    walk(_redacted(dataclasses.asdict(settings)), "")
    return out


def to_yaml(settings: Settings) -> str:
    """The settings as YAML (URI credentials redacted), as each step logs it."""
    return OmegaConf.to_yaml(OmegaConf.create(_redacted(dataclasses.asdict(settings))))


def code_version() -> str:
    """The git commit of the project, with '-dirty' for uncommitted changes, or 'unknown'."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{commit}-dirty" if dirty else commit


Args = ParamSpec("Args")


@functools.cache
def redact_log_records() -> None:
    """Every log record from now on, its message and its traceback, with ``redact``: a library's warning (MLflow's
    retries, a driver's message) that quotes a URI shows no credentials."""
    make_record = logging.getLogRecordFactory()

    def redacted_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        try:
            record.msg, record.args = redact(record.getMessage()), None
        except (TypeError, ValueError):  # arguments that do not fit the format: logging reports those itself
            return record
        if record.exc_info:
            record.exc_text = redact("".join(traceback.format_exception(*record.exc_info)).rstrip("\n"))
        return record

    logging.setLogRecordFactory(redacted_record)


def command(main: Callable[Args, None]) -> Callable[Args, None]:
    """Wrap a command line's ``main`` so that a PipelineError ends it as one line, ``error: <message>``, with exit
    status 1. Every entry point goes through it: the Hydra steps through ``entrypoint``, the argparse ones directly.

    Nothing it prints holds credentials: the line, the log records (``redact_log_records``) and the traceback of any
    other exception, which it prints itself (exit status 1), so that Hydra does not echo the overrides."""

    @functools.wraps(main)
    def guarded(*args: Args.args, **kwargs: Args.kwargs) -> None:
        redact_log_records()
        try:
            main(*args, **kwargs)
        except PipelineError as exc:
            print(f"error: {redact(str(exc))}", file=sys.stderr)
            sys.exit(1)
        except Exception:
            print(redact(traceback.format_exc()), end="", file=sys.stderr)
            sys.exit(1)

    return guarded


def entrypoint(task: Callable[[Settings], Any]) -> Callable[[], None]:
    """Wrap ``task(settings)`` as a Hydra command line that reports PipelineErrors as one line (``command``).

    The overrides are checked, and the config composed and validated, before Hydra runs the task: Hydra itself would
    report a bad key or value in several lines. The task gets the typed settings (agnews/settings.py)."""

    @functools.wraps(task)
    def typed(cfg: DictConfig) -> None:
        task(validate(cfg))

    hydra_main = hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(command(typed))

    @command
    def main() -> None:
        sys.argv = [sys.argv[0], *split_overrides(sys.argv[1:])]
        compose([arg for arg in sys.argv[1:] if _OVERRIDE.fullmatch(arg)])
        hydra_main()

    return main
