"""MLflow connection and the run that each step logs into."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import requests
from mlflow.entities import Run
from omegaconf import DictConfig

from agnews.config import code_version, flatten, to_yaml
from agnews.errors import TrackingError

log = logging.getLogger(__name__)


def connect(cfg: DictConfig) -> None:
    """Point MLflow at ``tracking.uri`` and its experiment; a server that does not answer fails in seconds.

    Under ``mlflow run``, which has started the run already, the run's own experiment stays.
    """
    uri = str(cfg.tracking.uri)
    scheme = urlparse(uri).scheme
    artifact_location = None
    if scheme in ("http", "https"):
        try:
            requests.get(f"{uri.rstrip('/')}/health", timeout=cfg.tracking.connect_timeout_s).raise_for_status()
        except requests.RequestException as exc:
            raise TrackingError(
                f"no MLflow tracking server at {uri} ({type(exc).__name__}): start one (`docker compose up mlflow -d` "
                "or `mlflow server`), or unset MLFLOW_TRACKING_URI to use the local SQLite store"
            ) from None
    elif scheme == "sqlite":
        # sqlite:///relative/path is relative to the current folder and sqlite:////abs/path absolute, as in MLflow
        # (SQLAlchemy's URL form); artifacts go beside the database.
        database = Path(urlparse(uri).path[1:]).resolve()
        database.parent.mkdir(parents=True, exist_ok=True)
        artifact_location = (database.parent / "artifacts").as_uri()
    mlflow.set_tracking_uri(uri)
    name = cfg.tracking.experiment
    try:
        if run_id := os.environ.get("MLFLOW_RUN_ID"):  # under `mlflow run`: join its run, in its experiment
            joined = mlflow.get_experiment(mlflow.get_run(run_id).info.experiment_id).name
            if joined != name:
                log.warning("logging into experiment '%s', not '%s': pass `--experiment-name %s`", joined, name, name)
            return
        if mlflow.get_experiment_by_name(name) is None:
            mlflow.create_experiment(name, artifact_location=artifact_location)
        mlflow.set_experiment(name)
    except mlflow.exceptions.MlflowException as exc:
        raise TrackingError(f"MLflow at {uri} refused experiment '{name}': {exc.message}") from None


@contextlib.contextmanager
def step_run(cfg: DictConfig, step: str, nested: bool = False) -> Iterator[Run]:
    """Start (or, under ``mlflow run``, join) the step's run and log its composed config."""
    connect(cfg)
    with mlflow.start_run(run_name=step, nested=nested) as run:
        mlflow.set_tags({"step": step, "git_commit": code_version()})
        mlflow.log_params(flatten(cfg))
        mlflow.log_text(to_yaml(cfg), "config.yaml")
        log.info(
            "%s: MLflow run %s in experiment '%s' at %s",
            step,
            run.info.run_id,
            mlflow.get_experiment(run.info.experiment_id).name,
            cfg.tracking.uri,
        )
        yield run
