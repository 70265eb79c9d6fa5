"""The promotion history: one immutable object per move of the served champion, and `python -m steps.history`.

The scenario runs against the session's real `mlflow server` (SQLite, artifacts on the moto S3 server) and mirrors to
a fresh bucket: a gate promotion, a manual one (registry.version=N), a rollback and a move in the UI (through
MlflowClient, as the UI's REST call does) completed by `python -m steps.mirror`.
"""

from __future__ import annotations

import itertools
import json
import shlex
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.projects._project_spec import load_project

from agnews.config import PROJECT_ROOT, compose
from agnews.errors import StorageError
from agnews.names import CHAMPION
from agnews.promotion.history import Entry, Served, append, entries, served_at
from agnews.promotion.register import register
from agnews.storage import LocalStorage, open_storage
from agnews.tracking import step_run
from bundle.layout import MANIFEST, POINTER, sha256
from tests.helpers import TrainRuns

GATE_OPEN = ["registry.min_accuracy=0", "registry.min_behaviour_pass_rate=0", "registry.tolerance=0"]
T0 = datetime(2025, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)


def entry(at: datetime, version: int, previous: int | None, how: str = "gate") -> Entry:
    served = Served(previous, f"{previous:064x}") if previous else None
    return Entry(at, Served(version, f"{version:064x}"), served, how, "gate", "promoted by the production gate")


def test_entries_are_written_once_and_read_newest_first(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path)
    first, second = entry(T0, 1, None), entry(T0 + timedelta(hours=1), 2, 1, "manual")
    url = append(storage, "models/m", first)
    assert url.endswith("/models/m/history/20250102T030405.123456Z-v1.json")
    append(storage, "models/m", second)
    with pytest.raises(StorageError, match=r"^\S+-v1\.json exists: a promotion history entry is never rewritten$"):
        append(storage, "models/m", first)
    assert entries(storage, "models/m") == [second, first]
    assert served_at([second, first], T0 - timedelta(seconds=1)) is None
    assert served_at([second, first], T0 + timedelta(minutes=59)) == first
    assert served_at([second, first], T0 + timedelta(hours=2)) == second
    assert json.loads(storage.read_bytes(url.removeprefix(tmp_path.as_uri() + "/")))["from"] is None


def cli(step: str, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", f"steps.{step}", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_history_lists_gate_manual_rollback_and_ui_moves_in_order(train_runs: TrainRuns, bucket: str) -> None:
    overrides = [
        f"tracking.uri={train_runs.tracking_uri}",
        "tracking.experiment=registry-tests",  # the experiment of the session's train runs
        f"storage.uri=s3://{bucket}",
        f"registry.model_name=history-{bucket[-8:]}",
        *GATE_OPEN,
    ]
    for run in (train_runs.worse, train_runs.good):  # gate: nothing -> v1 -> v2
        cfg = compose([*overrides, f"registry.run_id={run}"])
        with step_run(cfg, "register"):
            register(cfg.registry, cfg.storage, cfg.tracking.experiment, cfg.registry.run_id)
    cli("register", *overrides, "registry.version=1")  # manual: v2 -> v1
    cli("register", *overrides, "registry.rollback=true")  # rollback: v1 -> v2
    MlflowClient(train_runs.tracking_uri).set_registered_model_alias(cfg.registry.model_name, CHAMPION, 1)  # the UI
    cli("mirror", *overrides)  # completes the UI's move: v2 -> v1
    cli("mirror", *overrides)  # storage already serves @champion: no entry

    storage, root = open_storage(cfg.storage), f"models/{cfg.registry.model_name}"
    docs = [json.loads(storage.read_bytes(key)) for key in storage.list(f"{root}/history/")]
    moves = [(d["from"] and d["from"]["version"], d["to"]["version"], d["how"], d["who"]) for d in docs]
    assert moves == [
        (None, 1, "gate", "gate"),
        (1, 2, "gate", "gate"),
        (2, 1, "manual", "manual"),
        (1, 2, "rollback", "manual"),
        (2, 1, "ui", "manual"),
    ]
    for doc in docs:  # the digest of the manifest in the version's folder
        digest = doc["to"]["manifest_sha256"]
        assert sha256(storage.read_bytes(f"{root}/v{doc['to']['version']}-{digest[:12]}/{MANIFEST}")) == digest
        assert doc["gate"].startswith("promoted by the production gate"), "the verdict at registration"
    for earlier, later in itertools.pairwise(docs):
        assert later["from"] == earlier["to"], "each move starts where the last one left storage"
        assert earlier["at"] < later["at"]
    pointer = json.loads(storage.read_bytes(f"{root}/{POINTER}"))
    assert (pointer["version"], pointer["manifest_sha256"]) == (1, docs[-1]["to"]["manifest_sha256"])

    printed = cli("history", *overrides).stdout.splitlines()
    assert len(printed) == len(docs)
    for line, doc in zip(printed, reversed(docs), strict=True):  # newest first
        assert f"v{doc['to']['version']} (manifest {doc['to']['manifest_sha256'][:12]})" in line
        assert f"how: {doc['how']}, who: {doc['who']}" in line
    manual, rollback = (datetime.fromisoformat(docs[i]["at"]) for i in (2, 3))
    between = manual + (rollback - manual) / 2
    entry_point = load_project(str(PROJECT_ROOT)).get_entry_point("history")
    argv = shlex.split(
        entry_point.compute_command({"at": between.isoformat(), "overrides": shlex.join(overrides)}, None)
    )
    answer = cli("history", *argv[3:]).stdout.strip()  # as `mlflow run . -e history -P at=... -P overrides=...`
    assert answer.startswith(f"at {between.isoformat()}: v1 (manifest {docs[2]['to']['manifest_sha256'][:12]})")
    assert "how: manual" in answer
    before = cli("history", *overrides, "--at", "2000-01-01T00:00:00").stdout.strip()
    assert before == "at 2000-01-01 00:00:00+00:00: nothing served"
