"""Runs left RUNNING by a step that died without closing them (kill -9, out of memory, a lost node or container).

MLflow closes a run when its process ends it; a process that is killed never does, and the run stays RUNNING for
good. ``close_stale`` finds such runs and marks them KILLED, the status MLflow itself gives a run whose
``mlflow run`` was interrupted. A run is stale when

- its step ran on this machine (the ``process.*`` tags that ``step_run`` sets) and that process is gone, or
- it started more than ``tracking.cleanup.stale_after_minutes`` ago: the only sign left for a run from another
  machine or container, whose process cannot be checked from here.

A run whose process is alive on this machine is never closed, however long it has been running.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from dataclasses import dataclass

import mlflow
import psutil
from mlflow import MlflowClient
from mlflow.entities import Run, RunStatus, ViewType

from agnews.names import CLOSED_TAG, HOST_TAG, PID_TAG, STARTED_TAG, STEP_TAG
from agnews.settings import CleanupSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stale:
    run_id: str
    experiment: str
    step: str
    reason: str


def process_gone(tags: dict[str, str]) -> str | None:
    """Why the process that ran a run is known to be gone, or None: alive, or not on this machine."""
    host = tags.get(HOST_TAG)
    if host != socket.gethostname():
        return None
    try:
        pid, started = int(tags[PID_TAG]), float(tags[STARTED_TAG])
    except (KeyError, ValueError):
        return None
    try:
        process = psutil.Process(pid)
        # the same pid, given to another process since, has another start time; a killed process that its parent
        # has not reaped yet is a zombie
        alive = abs(process.create_time() - started) < 1 and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        alive = False
    except psutil.Error:  # access denied: it exists
        alive = True
    return None if alive else f"its process {pid} on {host} is gone"


def staleness(run: Run, stale_after_minutes: float, now_ms: int) -> str | None:
    """Why ``run`` (RUNNING) is stale, or None."""
    if reason := process_gone(run.data.tags):
        return reason
    minutes = (now_ms - run.info.start_time) / 60_000
    if minutes > stale_after_minutes and not _alive_here(run.data.tags):
        return f"RUNNING for {minutes:.0f} minutes (tracking.cleanup.stale_after_minutes={stale_after_minutes})"
    return None


def _alive_here(tags: dict[str, str]) -> bool:
    return tags.get(HOST_TAG) == socket.gethostname() and PID_TAG in tags and process_gone(tags) is None


def find_stale(client: MlflowClient, stale_after_minutes: float, exclude: str | None = None) -> list[Stale]:
    """The stale RUNNING runs of every active experiment, oldest first."""
    now_ms = int(time.time() * 1000)
    experiments = {e.experiment_id: e.name for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)}
    if not experiments:
        return []
    runs = client.search_runs(
        list(experiments), filter_string="attributes.status = 'RUNNING'", order_by=["attributes.start_time ASC"]
    )
    stale = []
    for run in runs:
        if run.info.run_id != exclude and (reason := staleness(run, stale_after_minutes, now_ms)):
            stale.append(Stale(run.info.run_id, experiments[run.info.experiment_id], _step(run), reason))
    return stale


def _step(run: Run) -> str:
    return run.data.tags.get(STEP_TAG) or run.info.run_name or "?"


def close_stale(settings: CleanupSettings, exclude: str | None = None) -> list[Stale]:
    """Mark every stale RUNNING run KILLED (with ``tracking.cleanup.dry_run``, only list them); returns them.

    ``settings`` is ``tracking.cleanup``. Expects MLflow connected (``connect`` or ``step_run``); ``exclude`` is the
    caller's own run.
    """
    client = MlflowClient()
    stale = find_stale(client, settings.stale_after_minutes, exclude)
    for run in stale:
        if settings.dry_run:
            log.info("stale: run %s (%s, %s): %s", run.run_id, run.experiment, run.step, run.reason)
            continue
        client.set_tag(run.run_id, CLOSED_TAG, run.reason)
        client.set_terminated(run.run_id, RunStatus.to_string(RunStatus.KILLED))
        log.info("closed run %s (%s, %s) as KILLED: %s", run.run_id, run.experiment, run.step, run.reason)
    verb = "found" if settings.dry_run else "closed"
    log.info("%s %d stale run(s)%s", verb, len(stale), " (tracking.cleanup.dry_run=true)" if settings.dry_run else "")
    if mlflow.active_run():
        mlflow.log_metric("stale_runs", len(stale))
        mlflow.log_text(json.dumps([run.__dict__ for run in stale], indent=2, default=str), "stale_runs.json")
    return stale
