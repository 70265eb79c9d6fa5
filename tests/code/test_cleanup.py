"""The `cleanup` step: runs that a SIGKILLed step left RUNNING become KILLED; live runs stay RUNNING."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from agnews.config import PROJECT_ROOT
from agnews.names import CLOSED_TAG, HOST_TAG, PID_TAG, STARTED_TAG
from tests.helpers import run_step

pytestmark = pytest.mark.integration  # steps started and killed

# A step that opens its run, prints the run id, and works (sleeps) until it is killed.
WORKING_STEP = """
import sys, time
from agnews.config import compose
from agnews.tracking import step_run
with step_run(compose(sys.argv[2:]), sys.argv[1]) as run:
    print(run.info.run_id, flush=True)
    time.sleep(600)
"""


@pytest.fixture
def tracking(tmp_path: Path, mlflow_db: Path) -> str:
    return f"sqlite:///{shutil.copy(mlflow_db, tmp_path)}"


@pytest.fixture
def env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "S3_BUCKET")} | {
        "PYTHONPATH": str(PROJECT_ROOT)
    }


@pytest.fixture
def working(tracking: str, env: dict[str, str], tmp_path: Path) -> Iterator:
    """``start(step)`` starts a working step in a process of its own; returns (process, run id)."""
    started: list[subprocess.Popen] = []

    def start(step: str) -> tuple[subprocess.Popen, str]:
        process = subprocess.Popen(
            [sys.executable, "-c", WORKING_STEP, step, f"tracking.uri={tracking}", f"storage.uri={tmp_path}"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        started.append(process)
        for line in process.stdout:
            if re.fullmatch(r"[0-9a-f]{32}", line.strip()):
                return process, line.strip()
        pytest.fail(f"the {step} step exited ({process.wait()}) before opening its run")

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
        process.wait()


def cleanup(tracking: str, env: dict[str, str], cwd: Path, *overrides: str) -> str:
    return run_step("cleanup", f"tracking.uri={tracking}", *overrides, check=True, cwd=cwd, env=env).stdout


def test_cleanup_closes_the_runs_of_killed_steps(working, tracking: str, env: dict[str, str], tmp_path: Path) -> None:
    killed, killed_run = working("upload")
    live, live_run = working("train")
    killed.send_signal(signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL
    client = MlflowClient(tracking)
    experiment = client.get_experiment_by_name("agnews").experiment_id
    # runs from another machine or container, whose process cannot be checked from here: only their age counts
    elsewhere = {HOST_TAG: "another-host", PID_TAG: "1", STARTED_TAG: "0", "step": "mirror"}
    day_old = client.create_run(experiment, start_time=int((time.time() - 86400) * 1000), tags=elsewhere)
    recent = client.create_run(experiment, tags=elsewhere)
    runs = [killed_run, live_run, day_old.info.run_id, recent.info.run_id]
    assert [client.get_run(r).info.status for r in runs] == ["RUNNING"] * 4

    listed = cleanup(
        tracking, env, tmp_path, "tracking.cleanup.dry_run=true", "tracking.cleanup.stale_after_minutes=60"
    )
    assert f"stale: run {killed_run} (agnews, upload): its process {killed.pid} on " in listed
    assert f"stale: run {day_old.info.run_id} (agnews, mirror): RUNNING for 1440 minutes" in listed
    assert "found 2 stale run(s) (tracking.cleanup.dry_run=true)" in listed
    assert [client.get_run(r).info.status for r in runs] == ["RUNNING"] * 4  # a dry run changes nothing

    closed = cleanup(tracking, env, tmp_path, "tracking.cleanup.stale_after_minutes=60")
    assert f"closed run {killed_run} (agnews, upload) as KILLED: its process {killed.pid} on " in closed
    assert "closed 2 stale run(s)" in closed
    assert [client.get_run(r).info.status for r in runs] == ["KILLED", "RUNNING", "KILLED", "RUNNING"]
    killed_info = client.get_run(killed_run)
    assert killed_info.data.tags[CLOSED_TAG].startswith(f"its process {killed.pid} on ")
    assert killed_info.info.end_time is not None
    assert live.poll() is None  # the live step was left alone, and is still working

    # however old, a run whose process is alive on this machine stays RUNNING
    cleanup(tracking, env, tmp_path, "tracking.cleanup.stale_after_minutes=0")
    assert client.get_run(live_run).info.status == "RUNNING"
    assert client.get_run(recent.info.run_id).info.status == "KILLED"
    (own,) = client.search_runs([experiment], "tags.step = 'cleanup' and attributes.status = 'FINISHED'", max_results=1)
    assert own.data.metrics["stale_runs"] == 1
