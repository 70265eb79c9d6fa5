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
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.projects._project_spec import load_project

from agnews.config import PROJECT_ROOT, compose
from agnews.errors import HistoryError, StorageError
from agnews.names import CHAMPION
from agnews.promotion.history import Entry, Served, append, entries, served_at
from agnews.promotion.register import register
from agnews.storage import LocalStorage, open_storage
from agnews.tracking import step_run
from bundle.layout import MANIFEST, POINTER, sha256
from tests.helpers import TrainRuns, run_step

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
    return run_step(step, *args, check=True)


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
    moves = [(d["from"] and d["from"]["version"], d["to"]["version"], d["how"], d["who"], d["via"]) for d in docs]
    assert moves == [
        (None, 1, "gate", "gate", "register"),
        (1, 2, "gate", "gate", "register"),
        (2, 1, "manual", "manual", "register"),
        (1, 2, "rollback", "manual", "register"),
        (2, 1, "ui", "manual", "mirror"),  # how @champion moved, and how storage learned of it
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


def test_a_rewritten_removed_or_forged_entry_breaks_the_chain_where_it_is(tmp_path: Path, call_step) -> None:
    """Each entry holds its own digest and that of the entry before it: an entry edited by hand, one replaced by a
    self-consistent forgery, or one removed stops the reading at the first broken link, named in one line."""
    storage, root = LocalStorage(tmp_path), "models/m"
    urls = [append(storage, root, entry(T0 + timedelta(hours=i), i + 1, i or None)) for i in range(3)]
    first, middle, _ = (url.removeprefix(tmp_path.as_uri() + "/") for url in urls)
    assert [e.to.version for e in entries(storage, root)] == [3, 2, 1]
    original = storage.read_bytes(middle)

    edited = json.loads(original) | {"who": "someone else"}  # a raw edit: the digest no longer matches
    storage.write_bytes(middle, json.dumps(edited, indent=2).encode())
    with pytest.raises(HistoryError, match=rf"^{urls[1]}: the promotion history's chain is broken here: its fields"):
        entries(storage, root)

    forged = Entry(T0 + timedelta(hours=1), Served(2, "f" * 64), Served(1, f"{1:064x}"), "gate", "forger", "")
    storage.write_bytes(middle, replace(forged, after=json.loads(original)["after"]).to_bytes())  # self-consistent
    with pytest.raises(HistoryError, match=rf"^{urls[2]}: the promotion history's chain is broken here: it follows"):
        entries(storage, root)

    storage.delete(middle)
    with pytest.raises(HistoryError, match=rf"^{urls[2]}: the promotion history's chain is broken here"):
        entries(storage, root)

    storage.write_bytes(middle, original)
    assert [e.to.version for e in entries(storage, root)] == [3, 2, 1], "the original entry mends the chain"
    storage.write_bytes(first, storage.read_bytes(first).replace(b'"how": "gate"', b'"how": "manual"'))
    printed = call_step("history", f"storage.uri={tmp_path}", "registry.model_name=m")
    assert printed.returncode == 1 and printed.stdout == ""
    assert printed.stderr.splitlines() == [
        f"error: {urls[0]}: the promotion history's chain is broken here: its fields do not match its digest "
        f"{json.loads(storage.read_bytes(first))['digest'][:12]} (the entry was rewritten)"
    ]


def test_a_move_whose_entry_could_not_be_written_is_recorded_by_the_next_mirror(
    train_runs: TrainRuns, tmp_path: Path
) -> None:
    """A history folder that can't be written (a file in its place): the gate moves champion.json to v1, the append
    fails, and the error says where the pointer is. The next mirror notices the pointer the history lacks and records
    the move, marked recovered; `steps.history --at` names v1; a mirror after that has nothing to do."""
    store, name = tmp_path / "store", f"lost-{tmp_path.name[-8:]}"
    overrides = [
        f"tracking.uri={train_runs.tracking_uri}",
        "tracking.experiment=registry-tests",
        f"storage.uri={store}",
        f"registry.model_name={name}",
        *GATE_OPEN,
    ]
    root = store / "models" / name
    root.mkdir(parents=True)
    (root / "history").write_text("a file where the history folder should be")
    cfg = compose([*overrides, f"registry.run_id={train_runs.good}"])
    with pytest.raises(HistoryError) as failed, step_run(cfg, "register"):
        register(cfg.registry, cfg.storage, cfg.tracking.experiment, cfg.registry.run_id)
    assert f"names {name} v1 now, but cannot record the move in the promotion history" in str(failed.value)
    assert "previous complete version" not in str(failed.value)
    assert json.loads((root / POINTER).read_bytes())["version"] == 1

    (root / "history").unlink()
    cli("mirror", *overrides)
    storage = LocalStorage(store)
    [recovered] = entries(storage, f"models/{name}")
    assert (recovered.previous, recovered.to.version, recovered.how, recovered.recovered) == (None, 1, "gate", True)
    now = datetime.now(UTC).isoformat()
    assert cli("history", *overrides, "--at", now).stdout.startswith(f"at {now}: v1 (manifest")
    again = cli("mirror", *overrides)
    assert len(entries(storage, f"models/{name}")) == 1, "pointer and history agree: nothing to do"
    assert "already names" in again.stdout + again.stderr
