"""Concurrent register and mirror: the lease lock (S3 conditional writes on moto, O_EXCL files), and ten rounds of
concurrent processes against a real `mlflow server`, on SQLite and on PostgreSQL, that must end as if serial.

The processes reuse the session's two train runs (a worse and a better one), registered by run id, so no round
trains anything. They are spawned once and then started together, round after round, by a barrier.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path

import boto3
import pytest
from mlflow import MlflowClient

from agnews.config import PROJECT_ROOT, compose
from agnews.errors import LeaseError, PipelineError
from agnews.lease import Lease
from agnews.names import CHALLENGER, CHAMPION, PREVIOUS, PROMOTED_BY, RECORDED_CHAMPION
from agnews.promotion.registry import aliases
from agnews.storage import open_storage
from bundle.layout import MANIFEST, POINTER, sha256
from tests.helpers import TrainRuns, moto_environ

pytestmark = pytest.mark.promotion  # make test-promotion

ROUNDS = 10
EXPERIMENT = "registry-tests"
GATE_OPEN = ["registry.min_accuracy=0", "registry.min_behaviour_pass_rate=0", "registry.tolerance=0"]
LOCK = "models/m/.lock"


# ---- the lease on its own -------------------------------------------------------------------------------------


@pytest.fixture(params=["s3", "local"])
def lock_storage(request: pytest.FixtureRequest, tmp_path, monkeypatch: pytest.MonkeyPatch):
    """Storage for a lock: a fresh bucket on the moto server (conditional writes made atomic, as S3's are), or a
    local folder."""
    if request.param == "local":
        return open_storage(compose([f"storage.uri={tmp_path / 'store'}"]).storage)
    request.getfixturevalue("atomic_conditional_writes")
    bucket = request.getfixturevalue("bucket")
    return open_storage(compose([f"storage.uri=s3://{bucket}/prefix"]).storage)


def test_one_contender_of_many_gets_the_lease(lock_storage) -> None:
    contenders = [Lease(lock_storage, LOCK, f"contender {i}", 60) for i in range(8)]
    start = threading.Barrier(len(contenders))
    won: list[Lease] = []

    def contend(lease: Lease) -> None:
        start.wait()
        try:
            lease.acquire(wait_s=0)
        except LeaseError:
            return
        won.append(lease)

    threads = [threading.Thread(target=contend, args=(lease,)) for lease in contenders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(won) == 1
    holder = won[0]
    holder.check()
    loser = next(lease for lease in contenders if lease is not holder)
    with pytest.raises(LeaseError, match=r"is held by .* \(contender \d\) until .*gave up after 0s"):
        loser.acquire(wait_s=0)
    assert holder.release()
    loser.acquire(wait_s=0)
    assert loser.release()
    assert lock_storage.read_token(LOCK) is None, "released: no lock left behind"


def test_a_waiting_contender_gets_the_lease_once_it_is_released(lock_storage) -> None:
    first, second = (Lease(lock_storage, LOCK, name, 60) for name in ("first", "second"))
    first.acquire(wait_s=0)
    waiting = threading.Thread(target=second.acquire, kwargs={"wait_s": 60})
    waiting.start()
    with pytest.raises(LeaseError):
        second.check()  # not yet
    assert first.release()
    waiting.join()
    second.check()
    assert second.release()


def test_an_expired_lease_is_taken_over_and_its_holder_finds_out(lock_storage) -> None:
    """A holder that stopped renewing (a dead or paused process) loses the lock once its lease has expired: the next
    contender takes it over with a conditional write, and the old holder's next check (which re-reads the lock, with
    no renewal in between), renewal and release all say so."""
    stalled = Lease(lock_storage, LOCK, "stalled", duration_s=60)
    stalled.acquire(wait_s=0)
    later = Lease(lock_storage, LOCK, "later", duration_s=60, clock=lambda: stalled.clock() + 3600)  # an hour on
    later.acquire(wait_s=0)
    assert json.loads(lock_storage.read_token(LOCK)[0])["purpose"] == "later"
    with pytest.raises(
        LeaseError, match=r"^the lease on \S+ was taken over by another holder: stalled stopped before its next write"
    ):
        stalled.check()
    assert not stalled.renew()
    assert not stalled.release()
    later.check()
    assert later.renew() and later.release()


def test_a_lease_that_ran_out_fails_its_check(lock_storage) -> None:
    """A holder whose renewals stopped (paused) finds, by its own clock, that its lease ran out: no write after that,
    even when nobody has taken the lock over yet."""
    now = [1000.0]
    lease = Lease(lock_storage, LOCK, "paused", duration_s=60, clock=lambda: now[0])
    lease.acquire(wait_s=0)
    lease.check()
    now[0] += 61
    with pytest.raises(LeaseError, match=r"ran out at .*, before it was renewed: paused stopped before its next write"):
        lease.check()
    assert lease.release(), "nobody took it over: the lock is still its own to delete"


# ---- concurrent processes against a real server ---------------------------------------------------------------


def worker(inbox: Queue, outbox: Queue, start: Barrier, env: dict[str, str]) -> None:
    """A register or mirror process: for each job, compose its config, wait for the others at ``start``, then do
    what `python -m steps.register` / `steps.mirror` do, and report the outcome."""
    os.environ.update(env)
    from agnews.promotion.mirror import mirror
    from agnews.promotion.register import register
    from agnews.tracking import connect, step_run

    while (job := inbox.get()) is not None:
        step, overrides = job
        cfg = compose(overrides)
        start.wait()
        try:
            if step == "register":
                with step_run(cfg, "register"):
                    outcome = register(cfg.registry, cfg.storage, cfg.tracking.experiment, cfg.registry.run_id)
                result: dict[str, object] = {"version": outcome.version, "alias": outcome.alias}
            else:
                connect(cfg.tracking)
                result = {"version": mirror(cfg.registry, cfg.storage).version}
        except PipelineError as exc:
            result = {"error": str(exc)}
        except Exception as exc:  # reported, so that the test fails with it instead of waiting for the worker
            result = {"error": f"{type(exc).__name__}: {exc}", "unexpected": True}
        outbox.put({"step": step, **result})


@dataclass
class Workers:
    inboxes: list[Queue]
    outbox: Queue

    def run(self, jobs: list[tuple[str, list[str]]]) -> list[dict]:
        """Run one job per worker, all started together; their results in the order they finished."""
        assert len(jobs) == len(self.inboxes)
        for inbox, job in zip(self.inboxes, jobs, strict=True):
            inbox.put(job)
        return [self.outbox.get(timeout=300) for _ in jobs]


JOBS = ("register", "register", "register", "mirror")  # three registers and a mirror in every round


@pytest.fixture(scope="module")
def workers(moto_server: str, atomic_conditional_writes: None) -> Iterator[Workers]:
    """One spawned process per job of a round, kept for every round."""
    context = multiprocessing.get_context("spawn")
    start, outbox = context.Barrier(len(JOBS)), context.Queue()
    inboxes = [context.Queue() for _ in JOBS]
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "S3_BUCKET", "MLFLOW_RUN_ID")}
    env |= moto_environ(moto_server)
    processes = [context.Process(target=worker, args=(inbox, outbox, start, env), daemon=True) for inbox in inboxes]
    for process in processes:
        process.start()
    yield Workers(inboxes, outbox)
    for inbox in inboxes:
        inbox.put(None)
    for process in processes:
        process.join(timeout=30)
        if process.is_alive():
            process.kill()


def serial_aliases(accuracies: list[float], tolerance: float) -> dict[str, int]:
    """The aliases that registering candidates with these accuracies one after another (as versions 1, 2, ...)
    leaves, with the gate open but for the comparison with the champion."""
    result: dict[str, int] = {}
    for version, accuracy in enumerate(accuracies, start=1):
        champion = result.get(CHAMPION)
        if champion is None or accuracy >= accuracies[champion - 1] - tolerance:
            if champion is not None:
                result[PREVIOUS] = champion
            result[CHAMPION] = version
            if result.get(CHALLENGER) == version:
                del result[CHALLENGER]
        else:
            result[CHALLENGER] = version
    return result


def objects(bucket: str, prefix: str) -> dict[str, bytes]:
    s3 = boto3.client("s3", endpoint_url=os.environ["S3_ENDPOINT_URL"])
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]
    return {key: s3.get_object(Bucket=bucket, Key=key)["Body"].read() for key in keys}


def assert_storage_serves(bucket: str, name: str, version: int) -> None:
    """champion.json names ``version``, whose folder holds every file its manifest lists, with that sha256; and no
    lease lock is left behind."""
    root = f"models/{name}"
    files = objects(bucket, root)
    assert f"{root}/.lock" not in files
    pointer = json.loads(files[f"{root}/{POINTER}"])
    manifest = files[f"{root}/{pointer['manifest']}"]
    assert pointer["version"] == version == json.loads(manifest)["version"]
    assert pointer["manifest_sha256"] == sha256(manifest)
    folder = pointer["manifest"].removesuffix(f"/{MANIFEST}")
    for file, meta in json.loads(manifest)["files"].items():
        assert sha256(files[f"{root}/{folder}/{file}"]) == meta["sha256"], file


def round_config(runs: TrainRuns, bucket: str, name: str, *overrides: str) -> list[str]:
    return [
        f"tracking.uri={runs.tracking_uri}",
        f"tracking.experiment={EXPERIMENT}",
        f"storage.uri=s3://{bucket}",
        f"registry.model_name={name}",
        *GATE_OPEN,
        *overrides,
    ]


def test_concurrent_registers_and_a_mirror_end_as_if_serial(
    registry_backend: TrainRuns, workers: Workers, s3_env: str, bucket: str, request: pytest.FixtureRequest
) -> None:
    """Ten rounds of three registers (worse, better, worse) and a mirror at once, each round on a new model: every
    round ends with the aliases of registering in version order (the order the lease let them in), the better model
    as the one champion, what each process reported, and storage serving that champion."""
    runs = registry_backend
    client = MlflowClient(runs.tracking_uri)
    accuracy = {run: client.get_run(run).data.metrics["test_accuracy"] for run in (runs.worse, runs.good)}
    assert accuracy[runs.good] > accuracy[runs.worse]
    candidates = [runs.worse, runs.good, runs.worse]
    backend = request.node.callspec.id
    for round_number in range(ROUNDS):
        name = f"race-{backend}-{round_number}-{uuid.uuid4().hex[:6]}"
        jobs = [("register", round_config(runs, bucket, name, f"registry.run_id={run}")) for run in candidates]
        jobs.append(("mirror", round_config(runs, bucket, name)))
        results = workers.run(jobs)

        registered = sorted((r for r in results if r["step"] == "register"), key=lambda r: r["version"])
        assert [r["version"] for r in registered] == [1, 2, 3], results
        versions = {v: client.get_model_version(name, str(v)) for v in (1, 2, 3)}
        order = [accuracy[versions[v].run_id] for v in (1, 2, 3)]
        expected = serial_aliases(order, tolerance=0)
        assert aliases(client, name) == expected, f"round {round_number}: {results}"
        assert versions[expected[CHAMPION]].run_id == runs.good, "the better model wins"
        for r in registered:  # what each process printed is what serial registration would have said
            alias = serial_aliases(order[: r["version"]], tolerance=0)
            assert r["alias"] == (CHAMPION if alias[CHAMPION] == r["version"] else CHALLENGER), results
        champion = client.get_model_version(name, str(expected[CHAMPION]))
        assert champion.tags[PROMOTED_BY] == "gate"
        assert client.get_registered_model(name).tags[RECORDED_CHAMPION] == str(expected[CHAMPION])
        (mirrored,) = [r for r in results if r["step"] == "mirror"]
        assert mirrored.get("version") in (1, 2, 3) or "has no @champion" in mirrored["error"], mirrored
        assert_storage_serves(bucket, name, expected[CHAMPION])


def test_concurrent_register_and_mirror_commands(
    train_runs: TrainRuns, s3_env: str, bucket: str, atomic_conditional_writes: None
) -> None:
    """The entry points themselves, `python -m steps.register` twice and `python -m steps.mirror`, started at once."""
    name = f"race-cli-{uuid.uuid4().hex[:6]}"
    common = round_config(train_runs, bucket, name)
    commands = [
        [sys.executable, "-m", "steps.register", *common, f"registry.run_id={train_runs.good}"],
        [sys.executable, "-m", "steps.register", *common, f"registry.run_id={train_runs.worse}"],
        [sys.executable, "-m", "steps.mirror", *common],
    ]
    processes = [
        subprocess.Popen(command, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for command in commands
    ]
    outputs = [process.communicate(timeout=600) for process in processes]
    assert [p.returncode for p in processes[:2]] == [0, 0], outputs
    assert processes[2].returncode == 0 or "has no @champion" in outputs[2][1], outputs[2]
    client = MlflowClient(train_runs.tracking_uri)
    good = next(v for v in (1, 2) if client.get_model_version(name, str(v)).run_id == train_runs.good)
    expected = {CHAMPION: good, CHALLENGER: 2} if good == 1 else {CHAMPION: 2, PREVIOUS: 1}
    assert aliases(client, name) == expected
    said = "".join(out for out, _ in outputs[:2])
    assert said.count("is @champion") == (1 if good == 1 else 2) and said.count("is @challenger") == (good == 1)
    assert_storage_serves(bucket, name, good)


# ---- a register paused past its lease, a register killed before its mirror ---------------------------------------

# `python -m steps.register` with one registry function wrapped, so that the process signals itself at a known point.
HOOKED_REGISTER = """
import os, signal, sys
from agnews.promotion import registry
from steps.register import main
real = registry.{function}
def hooked(*args, **kwargs):
    {before}
    result = real(*args, **kwargs)
    {after}
    return result
registry.{function} = hooked
sys.argv[0] = "steps.register"
main()
"""
# Stops itself (SIGSTOP) when it is about to create its version: after it has read @champion.
PAUSED_AFTER_READING = HOOKED_REGISTER.format(
    function="create_version", before="os.kill(os.getpid(), signal.SIGSTOP)", after=""
)
# Kills itself (SIGKILL) once its gate promotion is recorded: @champion has moved, its mirror has not begun.
KILLED_BEFORE_MIRROR = HOOKED_REGISTER.format(
    function="record", before="", after="args[3] == 'gate' and os.kill(os.getpid(), signal.SIGKILL)"
)
LEASE = "storage.lease_s=8"  # short enough to wait for, long enough to renew under load


def hooked_register(code: str, overrides: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", code, *overrides],
        cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def register_command(overrides: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", "steps.register", *overrides],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def wait_until_stopped(process: subprocess.Popen) -> None:
    """Wait until ``process`` has stopped itself (state T in /proc/<pid>/stat)."""
    deadline = time.monotonic() + 300
    while Path(f"/proc/{process.pid}/stat").read_text().split(")")[-1].split()[0] != "T":
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.1)


def history_moves(bucket: str, name: str) -> list[tuple[int | None, int, str, str]]:
    """(from, to, how, via) of each entry, oldest first."""
    docs = [json.loads(data) for _, data in sorted(objects(bucket, f"models/{name}/history/").items())]
    return [(d["from"] and d["from"]["version"], d["to"]["version"], d["how"], d["via"]) for d in docs]


def test_a_register_paused_past_its_lease_changes_nothing(
    train_runs: TrainRuns, bucket: str, atomic_conditional_writes: None
) -> None:
    """The issue's scenario: a register paused after it read @champion, for longer than its lease; a second register
    takes the lease over and promotes the better model; the first, resumed, changes nothing and says so in one line
    (with a gate that would have let its worse model through: registry.tolerance=1)."""
    name = f"fenced-{uuid.uuid4().hex[:6]}"
    common = round_config(train_runs, bucket, name, LEASE, "registry.tolerance=1")
    register_command([*common, f"registry.run_id={train_runs.worse}"])  # v1
    paused = hooked_register(PAUSED_AFTER_READING, [*common, f"registry.run_id={train_runs.worse}"])
    try:
        wait_until_stopped(paused)
        register_command([*common, f"registry.run_id={train_runs.good}"])  # waits out the lease, then v2
    finally:
        os.kill(paused.pid, signal.SIGCONT)
    out, err = paused.communicate(timeout=300)
    assert paused.returncode == 1, out + err
    assert re.fullmatch(
        rf"error: the lease on s3://{bucket}/models/{name}/\.lock (was taken over by another holder|ran out at \S+, "
        rf"before it was renewed): register {name} stopped before its next write and changed nothing more",
        err.strip().splitlines()[-1],
    ), err
    assert "steps.mirror" not in err
    client = MlflowClient(train_runs.tracking_uri)
    assert aliases(client, name) == {CHAMPION: 2, PREVIOUS: 1}
    assert len(client.search_model_versions(f"name = '{name}'")) == 2, "the paused register created no version"
    assert client.get_model_version(name, "2").run_id == train_runs.good
    assert_storage_serves(bucket, name, 2)
    assert history_moves(bucket, name) == [(None, 1, "gate", "register"), (1, 2, "gate", "register")]


def test_a_register_killed_before_its_mirror_is_caught_up_by_the_next(
    train_runs: TrainRuns, bucket: str, atomic_conditional_writes: None
) -> None:
    """kill -9 after @champion moved and before the mirror: storage still serves the old champion. The next register,
    whose model the gate rejects, first brings storage in line with the registry, and says so."""
    name = f"killed-{uuid.uuid4().hex[:6]}"
    common = round_config(train_runs, bucket, name, LEASE)
    register_command([*common, f"registry.run_id={train_runs.worse}"])  # v1
    killed = hooked_register(KILLED_BEFORE_MIRROR, [*common, f"registry.run_id={train_runs.good}"])
    killed.communicate(timeout=300)
    assert killed.returncode == -signal.SIGKILL
    client = MlflowClient(train_runs.tracking_uri)
    assert aliases(client, name) == {CHAMPION: 2, PREVIOUS: 1}
    assert json.loads(objects(bucket, f"models/{name}/{POINTER}")[f"models/{name}/{POINTER}"])["version"] == 1

    rejected = register_command([*common, f"registry.run_id={train_runs.worse}"])
    assert "storage serves v1, but @champion is v2: mirroring v2 first" in rejected.stdout
    assert f"{name} v3 is @challenger: rejected" in rejected.stdout
    assert aliases(client, name) == {CHAMPION: 2, PREVIOUS: 1, CHALLENGER: 3}
    assert_storage_serves(bucket, name, 2)
    # the gate moved @champion; the next register is how storage learned of it
    assert history_moves(bucket, name) == [(None, 1, "gate", "register"), (1, 2, "gate", "register")]
