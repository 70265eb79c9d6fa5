"""MLflow connection and the run that each step logs into."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import psutil
import requests
from mlflow.entities import Run
from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR

from agnews import names
from agnews.config import (
    PASSWORD_VARIABLE,
    USERNAME_VARIABLE,
    code_version,
    flatten,
    redact,
    to_yaml,
    without_credentials,
)
from agnews.database import tracking_store, unreachable
from agnews.errors import TrackingError
from agnews.settings import Settings, TrackingSettings

log = logging.getLogger(__name__)

# MLflow's own variables for a tracking server's basic auth (the supported way to pass credentials).


def process_tags() -> dict[str, str]:
    """The tags that identify this process: host name, pid and start time (seconds since the epoch)."""
    return {
        names.HOST_TAG: socket.gethostname(),
        names.PID_TAG: str(os.getpid()),
        names.STARTED_TAG: f"{psutil.Process().create_time():.2f}",
    }


def quiet_artifact_bars() -> None:
    """MLflow draws a tqdm bar for each artifact transfer; in a log file (stderr not a terminal) every redraw stays, a
    line of hundreds of characters. Off there, unless MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR says otherwise."""
    if not sys.stderr.isatty():
        os.environ.setdefault(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name, "false")


def connect(tracking: TrackingSettings) -> None:
    """Point MLflow at ``tracking.uri`` and its experiment; a server or database that does not answer fails in
    seconds, and a malformed URI at once, each in one line without the URI's credentials.

    Under ``mlflow run``, which has started the run already, the run's own experiment stays.
    """
    quiet_artifact_bars()
    # Credentials in an http(s) URI move to MLflow's MLFLOW_TRACKING_USERNAME/PASSWORD, and MLflow gets the URI
    # without them: MLflow prints its tracking URI ("View run ... at http://...") and passes it on to subprocesses.
    store = tracking_store(str(tracking.uri))  # a malformed URI fails here, in one line
    uri, credentials = without_credentials(str(tracking.uri))
    shown = redact(str(tracking.uri))
    if credentials:
        os.environ[USERNAME_VARIABLE], os.environ[PASSWORD_VARIABLE] = credentials
    scheme = urlparse(uri).scheme
    artifact_location = None
    if store is not None and scheme != "sqlite":
        # before MLflow, which retries for minutes, printing the driver's messages
        if why := unreachable(store, tracking.connect_timeout_s):
            raise TrackingError(f"cannot reach the tracking store at {shown}: {why}")
    elif scheme in ("http", "https"):
        auth = (
            (os.environ[USERNAME_VARIABLE], os.environ.get(PASSWORD_VARIABLE, ""))
            if os.environ.get(USERNAME_VARIABLE)
            else None
        )
        try:
            requests.get(f"{uri.rstrip('/')}/health", timeout=tracking.connect_timeout_s, auth=auth).raise_for_status()
        except requests.RequestException as exc:
            raise TrackingError(
                f"no MLflow tracking server at {shown} ({type(exc).__name__}): start one "
                "(`docker compose up mlflow -d` or `mlflow server`), or unset MLFLOW_TRACKING_URI to use the local "
                "SQLite store"
            ) from None
    elif scheme == "sqlite":
        # sqlite:///relative/path is relative to the current folder and sqlite:////abs/path absolute, as in MLflow
        # (SQLAlchemy's URL form); artifacts go beside the database.
        database = Path(urlparse(uri).path[1:]).resolve()
        database.parent.mkdir(parents=True, exist_ok=True)
        artifact_location = (database.parent / "artifacts").as_uri()
    mlflow.set_tracking_uri(uri)
    name = tracking.experiment
    try:
        if run_id := os.environ.get("MLFLOW_RUN_ID"):  # under `mlflow run`: join its run, in its experiment
            joined = mlflow.get_experiment(mlflow.get_run(run_id).info.experiment_id).name
            if joined != name:
                log.warning("logging into experiment '%s', not '%s': pass `--experiment-name %s`", joined, name, name)
            return
        if mlflow.get_experiment_by_name(name) is None:
            try:
                mlflow.create_experiment(name, artifact_location=artifact_location)
            except mlflow.exceptions.MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":  # else a process that started with this one made it
                    raise
        mlflow.set_experiment(name)
    except mlflow.exceptions.MlflowException as exc:
        raise TrackingError(f"MLflow at {shown} refused experiment '{name}': {redact(exc.message)}") from None


def error_line(exc: BaseException) -> str:
    """An error as the one line that a failed run's ``error`` tag holds: its type and first line, URIs redacted."""
    return redact(f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}".strip())


@contextlib.contextmanager
def step_run(cfg: Settings, step: str, nested: bool = False) -> Iterator[Run]:
    """Start (or, under ``mlflow run``, join) the step's run and log its composed config; a step that fails leaves
    its run FAILED with the error's one line as the ``error`` tag."""
    connect(cfg.tracking)
    with mlflow.start_run(run_name=step, nested=nested) as run:
        mlflow.set_tags({names.STEP_TAG: step, names.GIT_COMMIT_TAG: code_version(), **process_tags()})
        mlflow.log_params(flatten(cfg))
        mlflow.log_text(to_yaml(cfg), names.CONFIG_ARTIFACT)
        log.info(
            "%s: MLflow run %s in experiment '%s' at %s",
            step,
            run.info.run_id,
            mlflow.get_experiment(run.info.experiment_id).name,
            redact(str(cfg.tracking.uri)),
        )
        try:
            yield run
        except Exception as exc:
            mlflow.set_tag(names.ERROR_TAG, error_line(exc))
            raise
