"""The whole pipeline: upload -> train -> register (with mirror), as nested child runs of one parent run.

The steps run in this process (no nested ``mlflow run``, which would start Docker again inside a container).
The parent run tags each child's run id as ``child.<step>``, plus the registered version and its alias; a failed
child fails the parent, and both carry its error as the ``error`` tag.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Run

from agnews import names
from agnews.errors import ConfigError
from agnews.promotion.register import register
from agnews.promotion.registry import Verdict
from agnews.settings import Settings
from agnews.tracking import error_line, step_run
from agnews.training import train
from agnews.upload import upload_and_log

log = logging.getLogger(__name__)


@contextlib.contextmanager
def child(cfg: Settings, step: str, parent: Run) -> Iterator[Run]:
    """A nested run for ``step``, named on the parent; an error is tagged on both runs and fails both."""
    client = MlflowClient()
    with step_run(cfg, step, nested=True) as run:
        client.set_tag(parent.info.run_id, f"{names.CHILD_TAG_PREFIX}{step}", run.info.run_id)
        try:
            yield run
        except Exception as exc:  # step_run tags the child's own run
            message = error_line(exc)
            client.set_tag(parent.info.run_id, names.FAILED_STEP_TAG, step)
            client.set_tag(parent.info.run_id, names.ERROR_TAG, message)
            log.error("%s step failed (run %s): %s", step, run.info.run_id, message)
            raise


def pipeline(cfg: Settings, nested: bool = False) -> Verdict:
    """Upload (skipped when storage holds the identical dataset), train, and register the run just trained; ``nested``:
    as a child of the active run (``monitor.on_drift=retrain``)."""
    if cfg.registry.rollback or cfg.registry.version is not None or cfg.registry.run_id:
        raise ConfigError(
            "main registers the run it trains: use `python -m steps.register` for registry.run_id, "
            "registry.version or registry.rollback"
        )
    with step_run(cfg, "main", nested=nested) as parent:
        with child(cfg, "upload", parent):
            uploaded = upload_and_log(cfg)
        mlflow.set_tag("upload", "uploaded" if uploaded else "skipped")
        return train_and_register(cfg, parent)


def train_and_register(cfg: Settings, parent: Run) -> Verdict:
    """Train, then register that run, as child runs of the active ``parent``, which gets the verdict's tags."""
    with child(cfg, "train", parent) as trained:
        train(cfg)
    register_cfg = dataclasses.replace(cfg, registry=dataclasses.replace(cfg.registry, run_id=trained.info.run_id))
    with child(register_cfg, "register", parent):
        outcome = register(cfg.registry, cfg.storage, cfg.tracking.experiment, trained.info.run_id)
    mlflow.set_tags(outcome.tags())
    return outcome
