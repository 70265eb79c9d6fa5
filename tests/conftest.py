"""Shared fixtures: the real AG News copy, a moto S3 server over HTTP, a real `mlflow server`, composed configs."""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import logging
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import boto3
import pytest
import requests
from moto.server import ThreadedMotoServer

from agnews.config import PROJECT_ROOT, compose
from agnews.settings import Settings
from tests.helpers import (
    STEP_UNSET,
    Called,
    TrainRuns,
    WebhookReceiver,
    answers,
    free_port,
    moto_environ,
    require_agnews,
    s3_environment,
    start_receiver,
    stop_receiver,
    unavailable,
)

# Spark in local mode binds its driver to loopback, never to the machine's network interface.
os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--model-uri",
        help="the MLflow model that tests/model checks, e.g. models:/distilbert-agnews@champion",
    )
    parser.addoption(
        "--champion",
        action="store_true",
        help="tests/model: check the @champion of the registered model that --overrides configures",
    )
    parser.addoption(
        "--overrides",
        default="",
        help="tests/model: Hydra overrides of the config the model is judged by (its tracking URI, the gate's "
        "behavioural minimum), e.g. 'preset=smoke'",
    )
    parser.addoption(
        "--min-pass-rate",
        type=float,
        help="tests/model: the pass rate each kind of behavioural check needs (default: the gate's)",
    )


# A test that uses one of these fixtures (or a fixture built on one) trains, serves or builds something: it is marked
# integration, and `make test-fast` leaves it out. Beside the shared servers and runs, the module fixtures that
# train (test_train's `trained`, test_registry's `local`, test_export's `tiny`) or serve (the `auth_server` of
# test_tracking and test_compose, test_webhook_receiver's `served`). Tests that train or call make without them
# carry the mark themselves.
INTEGRATION_FIXTURES = {
    *("moto_server", "postgres", "lambda_package", "train_runs", "webhook_receiver"),
    *("trained", "local", "tiny", "auth_server", "served"),
    "registered_tiny",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if INTEGRATION_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def agnews_dir() -> Path:
    return require_agnews()


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """A standalone moto S3 server on 127.0.0.1, reached over real HTTP; yields its endpoint URL."""
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_env(moto_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point boto3 at the moto server with dummy credentials; returns the endpoint."""
    for name, value in moto_environ(moto_server).items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return moto_server


@pytest.fixture
def bucket(s3_env: str, request: pytest.FixtureRequest) -> str:
    """A fresh, empty bucket on the moto server (a valid, unique name, also for parametrized tests)."""
    name = f"agnews-{re.sub(r'[^a-z0-9]+', '-', request.node.name.lower())[:40].strip('-')}-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_env).create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def mlflow_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty MLflow SQLite store with its tables made once: copy it where a test or step needs a fresh store.

    Its Default experiment keeps artifacts beside the template (MLflow puts them in ./mlruns of the current folder).
    """
    from mlflow.tracking import MlflowClient  # heavy import, only for the tests that use it

    folder = tmp_path_factory.mktemp("mlflow-template")
    with contextlib.chdir(folder):
        MlflowClient(f"sqlite:///{folder / 'mlflow.db'}").search_experiments()
    return folder / "mlflow.db"


MAKE_CFG_DB = Path("mlflow", "mlflow.db")  # make_cfg's tracking store, under tmp_path


@pytest.fixture
def make_cfg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Compose the config with local storage and tracking under tmp_path, plus any overrides."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("S3_BUCKET", raising=False)

    def make(*overrides: str) -> Settings:
        return compose(
            [
                f"storage.uri={tmp_path / 'store'}",
                f"tracking.uri=sqlite:///{tmp_path / MAKE_CFG_DB}",
                f"train.output_dir={tmp_path / 'checkpoints'}",
                *overrides,
            ]
        )

    return make


@pytest.fixture
def make_cfg_store(mlflow_db: Path, tmp_path: Path) -> Path:
    """make_cfg's tracking store with its tables made (a copy of ``mlflow_db``), for a test that logs a run but does
    not test the store's creation: MLflow takes seconds to make a store's tables."""
    (tmp_path / MAKE_CFG_DB).parent.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(mlflow_db, tmp_path / MAKE_CFG_DB))


@pytest.fixture
def kept_logging() -> Iterator[None]:
    """Every logger's handlers, level and flags put back after the test: a Hydra entry point run in the test's process
    configures logging with dictConfig, which takes the handlers off each logger its config names (``agnews``, which
    is the Lambda handler's logger too, so that later tests of the handler would print no log lines)."""
    known = logging.Logger.manager.loggerDict.values()
    loggers = [logging.getLogger(), *(logger for logger in known if isinstance(logger, logging.Logger))]
    saved = [(logger, logger.handlers[:], logger.level, logger.propagate, logger.disabled) for logger in loggers]
    yield
    for logger, handlers, level, propagate, disabled in saved:
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate, logger.disabled = propagate, disabled


@pytest.fixture
def call_step(
    capfd: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, kept_logging: None
) -> Iterator[Callable[..., Called]]:
    """``call(step, *args)``: ``python -m steps.<step> args...`` called in this process: the step module's ``main``
    with those arguments in ``sys.argv``, from the project root and without ``STEP_UNSET``, as ``run_step`` runs it.
    For a test of what a command line answers before it runs anything, where a process of its own would only add
    its imports. Returns the exit status and what it printed. The log redaction that an entry point installs for
    good (``redact_log_records``) is taken back after the test: no other test in this process finds it installed."""
    from agnews.config import redact_log_records

    factory, installed = logging.getLogRecordFactory(), redact_log_records.cache_info().currsize

    def call(step: str, *args: str) -> Called:
        main = importlib.import_module(f"steps.{step}").main
        monkeypatch.setattr(sys, "argv", [f"steps.{step}", *args])
        monkeypatch.chdir(PROJECT_ROOT)
        for name in STEP_UNSET:
            monkeypatch.delenv(name, raising=False)
        capfd.readouterr()
        try:
            main()
            status = 0
        except SystemExit as exit_:
            status = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
        out, err = capfd.readouterr()
        return Called(status, out, err)

    yield call
    logging.setLogRecordFactory(factory)
    if not installed:
        redact_log_records.cache_clear()


# Seconds that `mlflow server` may take to create its SQLite schema and answer /health from every worker.
MLFLOW_SERVER_START_S = 180
DEFAULT_WORKERS = 4  # what `mlflow server` starts without --workers


@pytest.fixture(scope="session")
def mlflow_server(moto_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` subprocess on 127.0.0.1: SQLite backend, artifacts proxied to S3 on the moto server.

    Yields the tracking URI. Clients reach artifacts through the server (mlflow-artifacts:/), so they need no
    S3 settings of their own; the server's log is in its tmp folder. It delivers registry webhooks to local
    receivers (``running_mlflow_server``).
    """
    root = tmp_path_factory.mktemp("mlflow-server")
    with running_mlflow_server(f"sqlite:///{root / 'mlflow.db'}", moto_server, root) as uri:
        yield uri


@pytest.fixture
def iam_enforced(bucket: str, s3_env: str) -> Iterator[dict[str, tuple[str, str]]]:
    """IAM users 'writer' (s3:*) and 'reader' (get and list only) with keys; the server checks every request."""
    iam = boto3.client("iam", endpoint_url=s3_env)
    keys = {}
    for role, actions in {"writer": ["s3:*"], "reader": ["s3:GetObject", "s3:ListBucket"]}.items():
        user = f"{role}-{uuid.uuid4().hex[:8]}"
        iam.create_user(UserName=user)
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}
        iam.put_user_policy(UserName=user, PolicyName="s3", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName=user)["AccessKey"]
        keys[role] = (key["AccessKeyId"], key["SecretAccessKey"])
    requests.post(f"{s3_env}/moto-api/reset-auth", data=b"0", timeout=5).raise_for_status()
    try:
        yield keys
    finally:
        requests.post(f"{s3_env}/moto-api/reset-auth", data=b"inf", timeout=5).raise_for_status()


# ---- Promotion: tracking servers (SQLite and PostgreSQL) that deliver webhooks, shared train runs, receivers ----

# What `mlflow server` needs to deliver registry webhooks to a receiver on 127.0.0.1 over http (MLflow refuses both
# by default), and no webhook cache (MLflow caches the list for 60s), so that a webhook a test has just registered
# fires on the next event.
WEBHOOK_SERVER_ENV = {
    "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
    "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
    "MLFLOW_WEBHOOK_CACHE_TTL": "0",
}
REGISTRY_EXPERIMENT = "registry-tests"
TINY_TRAIN = ["preset=test", "data.val_size=200", "data.test_size=200"]
GOOD_TRAIN = [*TINY_TRAIN, "data.sample_size=1200", "train.epochs=2"]  # ~0.45 accuracy
WORSE_TRAIN = [*TINY_TRAIN, "data.sample_size=1000", "train.epochs=0.01"]  # chance: 0.25
# Evaluated on another test set: 100 test rows, not 200 (the identity is the test file's sha256 and the rows).
OTHER_TEST_SET_TRAIN = ["preset=test", "data.val_size=200", "data.sample_size=600"]


@contextlib.contextmanager
def running_mlflow_server(
    backend_uri: str, moto_server: str, root: Path, workers: int | None = 1, key: str | None = None
) -> Iterator[str]:
    """`mlflow server` on a free port of 127.0.0.1 with ``backend_uri``, artifacts in a fresh bucket on the moto
    server, and webhook delivery to local receivers (WEBHOOK_SERVER_ENV); yields its URI, stops its process group.

    ``workers``: None starts MLflow's default (4), each its own process; ``key``: the Fernet key that the workers
    encrypt webhook secrets with (MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY), None for none: each worker makes its own.
    """
    from agnews.names import WEBHOOK_KEY_ENV as KEY_ENV

    unset = ("MLFLOW_TRACKING_URI", "AWS_SESSION_TOKEN", "AWS_PROFILE", KEY_ENV)
    env = {k: v for k, v in os.environ.items() if k not in unset} | moto_environ(moto_server) | WEBHOOK_SERVER_ENV
    if key:
        env[KEY_ENV] = key
    bucket = f"mlflow-artifacts-{uuid.uuid4().hex[:8]}"
    boto3.client(
        "s3",
        endpoint_url=moto_server,
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_REGION"],
    ).create_bucket(Bucket=bucket)
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    log_file = (root / "server.log").open("wb")
    server = subprocess.Popen(
        [
            *(sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port)),
            *(("--workers", str(workers)) if workers else ()),
            *("--backend-store-uri", backend_uri),
            *("--artifacts-destination", f"s3://{bucket}/mlartifacts"),
        ],
        env=env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: the server and the workers it starts stop together
    )
    deadline = time.monotonic() + MLFLOW_SERVER_START_S

    def started() -> bool:  # every worker up: /health may answer from the first while the others still load
        log = (root / "server.log").read_text()
        return answers(f"{uri}/health") and log.count("Application startup complete") >= (workers or DEFAULT_WORKERS)

    while not started():
        if server.poll() is not None or time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):  # a server that exited has taken its group with it
                os.killpg(server.pid, signal.SIGKILL)
            pytest.fail(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    try:
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log_file.close()


@pytest.fixture(scope="session")
def atomic_conditional_writes(moto_server: str) -> Iterator[None]:
    """Make the moto server's conditional writes atomic, as S3's are.

    moto checks ``If-None-Match``/``If-Match`` and then stores the object in two steps, so two racing PUTs could both
    pass the check; S3 evaluates the condition and the write atomically. One lock around moto's PUT and DELETE
    handlers (in this process, which runs the server) restores that guarantee for the concurrency tests.
    """
    from moto.s3.responses import S3Response

    lock = threading.Lock()
    originals = {name: getattr(S3Response, name) for name in ("put_object", "delete_object")}

    def serialised(original):
        @functools.wraps(original)
        def handler(self, *args, **kwargs):
            with lock:
                return original(self, *args, **kwargs)

        return handler

    for name, original in originals.items():
        setattr(S3Response, name, serialised(original))
    yield
    for name, original in originals.items():
        setattr(S3Response, name, original)


def _postgres_tools() -> Path | None:
    """The newest PostgreSQL server's bin folder (Debian's postgresql package), or None."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    return found[-1].parent if found else None


@pytest.fixture(scope="session")
def postgres() -> Iterator[str]:
    """A throwaway PostgreSQL cluster (initdb, pg_ctl) on a free port of 127.0.0.1, in a temporary folder, with one
    database; yields its SQLAlchemy URI. As root, the cluster runs as the `postgres` user. Skipped where PostgreSQL is
    not installed (a failure under CI)."""
    tools = _postgres_tools()
    if tools is None:
        message = "PostgreSQL is not installed (apt-get install postgresql)"
        unavailable(message)
    root = Path(tempfile.mkdtemp(prefix="agnews-postgres-"))
    as_owner: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        owner = pwd.getpwnam("postgres")
        os.chown(root, owner.pw_uid, owner.pw_gid)
        as_owner = ["runuser", "-u", "postgres", "--"]
    data, port = root / "data", free_port()

    def run(*command: str) -> None:
        done = subprocess.run([*as_owner, *command], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{command[0]}: {done.stdout}{done.stderr}"

    run(str(tools / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
    run(str(tools / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-o", options, "-w", "start")
    try:
        import psycopg2

        connection = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres")
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute("CREATE DATABASE mlflow")
        connection.close()
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/mlflow"  # SQLAlchemy 2.1's default driver is psycopg 3
    finally:
        run(str(tools / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop")
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_mlflow_server(postgres: str, moto_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` on the PostgreSQL cluster, artifacts on the moto server, delivering webhooks."""
    with running_mlflow_server(postgres, moto_server, tmp_path_factory.mktemp("mlflow-postgres")) as uri:
        yield uri


@pytest.fixture(scope="session")
def keyed_mlflow_server(moto_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` as the README starts it, with its default workers (4), that share one
    MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY; SQLite backend, artifacts on the moto server, delivering webhooks."""
    from cryptography.fernet import Fernet  # MLflow's own dependency, which makes the key

    root = tmp_path_factory.mktemp("mlflow-keyed")
    key = Fernet.generate_key().decode()
    with running_mlflow_server(f"sqlite:///{root / 'mlflow.db'}", moto_server, root, workers=None, key=key) as uri:
        yield uri


@pytest.fixture(scope="session")
def keyless_mlflow_server(moto_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The same with no MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY: each of its 4 workers makes its own key, so a webhook
    secret that one stores the others cannot decrypt."""
    root = tmp_path_factory.mktemp("mlflow-keyless")
    with running_mlflow_server(f"sqlite:///{root / 'mlflow.db'}", moto_server, root, workers=None) as uri:
        yield uri


def server_config(
    tracking_uri: str, storage_uri: str, *overrides: str, experiment: str = REGISTRY_EXPERIMENT
) -> Settings:
    """The config of the tests on a tracking server: its experiment, the dataset storage, the real AG News."""
    return compose(
        [
            f"tracking.uri={tracking_uri}",
            f"tracking.experiment={experiment}",
            f"storage.uri={storage_uri}",
            f"data.source={require_agnews()}",
            *overrides,
        ]
    )


def train_run(cfg: Settings) -> str:
    """The train step on ``cfg``, in this process; returns its run id."""
    from agnews.tracking import step_run
    from agnews.training import train

    with step_run(cfg, "train") as run:
        train(cfg)
    return run.info.run_id


@pytest.fixture(scope="session")
def train_runs(mlflow_server: str, moto_server: str, tmp_path_factory: pytest.TempPathFactory) -> TrainRuns:
    """On the session's `mlflow server`: the upload, a deliberately worse training run, then a better (and so the
    newest) one, all on the real AG News; every registry and promotion test registers these."""
    from agnews.tracking import step_run
    from agnews.upload import upload_and_log

    bucket = f"registry-data-{uuid.uuid4().hex[:8]}"
    checkpoints = tmp_path_factory.mktemp("checkpoints")
    with s3_environment(moto_server):
        boto3.client("s3", endpoint_url=moto_server).create_bucket(Bucket=bucket)
        settings = (mlflow_server, f"s3://{bucket}", f"train.output_dir={checkpoints}")
        cfg = server_config(*settings)
        with step_run(cfg, "upload") as run:
            upload_and_log(cfg)
        upload = run.info.run_id
        worse, good = (train_run(server_config(*settings, *train)) for train in (WORSE_TRAIN, GOOD_TRAIN))
    return TrainRuns(mlflow_server, bucket, upload, worse, good)


@pytest.fixture(scope="session")
def other_test_set_run(train_runs: TrainRuns, moto_server: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A train run on the same server evaluated on another test set (100 rows where the others used 200); in its own
    experiment, so that the better run stays the newest of REGISTRY_EXPERIMENT (what `register` takes by default)."""
    checkpoints = tmp_path_factory.mktemp("checkpoints-other")
    overrides = [f"train.output_dir={checkpoints}", *OTHER_TEST_SET_TRAIN]
    storage = f"s3://{train_runs.data_bucket}"
    with s3_environment(moto_server):
        return train_run(server_config(train_runs.tracking_uri, storage, *overrides, experiment="other-test-set"))


def copy_train_run(source_uri: str, run_id: str, target_uri: str, experiment: str = REGISTRY_EXPERIMENT) -> str:
    """Copy a finished train run to another tracking server: its tags, params and metrics, and its logged model with
    every artifact, byte for byte, as a logged model of the copy. Returns the copy's run id."""
    import mlflow
    from mlflow.entities import LoggedModelOutput, Metric, Param
    from mlflow.tracking import MlflowClient

    source, target = MlflowClient(source_uri), MlflowClient(target_uri)
    run = source.get_run(run_id)
    model = [source.get_logged_model(o.model_id) for o in run.outputs.model_outputs][-1]
    found = target.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else target.create_experiment(experiment)
    tags = {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")}
    copy = target.create_run(experiment_id, run_name=run.info.run_name, tags=tags).info.run_id
    now = int(time.time() * 1000)
    target.log_batch(copy, metrics=[Metric(k, v, now, 0) for k, v in run.data.metrics.items()])
    params = [Param(k, v) for k, v in run.data.params.items()]
    for start in range(0, len(params), 100):
        target.log_batch(copy, params=params[start : start + 100])
    logged = target.create_logged_model(experiment_id, name=model.name, source_run_id=copy)
    with tempfile.TemporaryDirectory() as tmp:
        # the model's own location: a models:/ URI would be resolved against the global tracking URI
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=model.artifact_location, dst_path=tmp, tracking_uri=source_uri
        )
        target.log_model_artifacts(logged.model_id, local)
    target.finalize_logged_model(logged.model_id, "READY")
    target.log_outputs(copy, [LoggedModelOutput(logged.model_id, 0)])
    target.set_terminated(copy)
    return copy


@pytest.fixture(scope="session")
def run_copier() -> Callable[..., str]:
    """``copy_train_run``, for tests that need a train run on a second tracking store."""
    return copy_train_run


@pytest.fixture(scope="session")
def postgres_runs(train_runs: TrainRuns, postgres_mlflow_server: str, moto_server: str) -> TrainRuns:
    """The worse and the better train run, copied to the PostgreSQL-backed server (no second training)."""
    with s3_environment(moto_server):
        worse, good = (
            copy_train_run(train_runs.tracking_uri, r, postgres_mlflow_server)
            for r in (train_runs.worse, train_runs.good)
        )
    return TrainRuns(postgres_mlflow_server, train_runs.data_bucket, "", worse, good)


@pytest.fixture(scope="session")
def keyed_runs(train_runs: TrainRuns, keyed_mlflow_server: str, moto_server: str) -> TrainRuns:
    """The worse and the better train run, copied to the 4-worker server (no second training)."""
    with s3_environment(moto_server):
        worse, good = (
            copy_train_run(train_runs.tracking_uri, r, keyed_mlflow_server) for r in (train_runs.worse, train_runs.good)
        )
    return TrainRuns(keyed_mlflow_server, train_runs.data_bucket, "", worse, good)


@pytest.fixture(scope="session", params=["sqlite", "postgres"])
def registry_backend(request: pytest.FixtureRequest) -> TrainRuns:
    """The train runs on a `mlflow server` with SQLite, then on one with PostgreSQL (the same two runs)."""
    return request.getfixturevalue("train_runs" if request.param == "sqlite" else "postgres_runs")


@pytest.fixture
def webhook_receiver(moto_server: str, tmp_path: Path) -> Iterator[Callable[..., WebhookReceiver]]:
    """``start(cfg)`` runs the receiver for ``cfg`` (its tracking server, storage, model name and reconcile interval)
    as a subprocess, registers a webhook for it on the tracking server (``register=False``: none), and returns both;
    stopped, and the webhook deleted, after the test."""
    from mlflow.tracking import MlflowClient

    from agnews.names import WEBHOOK_SECRET_ENV as SECRET_ENV
    from agnews.promotion.webhook_admin import register_webhook

    started: list[tuple[WebhookReceiver, MlflowClient]] = []

    def start(cfg: Settings, register: bool = True) -> WebhookReceiver:
        secret = uuid.uuid4().hex
        log = tmp_path / f"receiver-{secret[:8]}.log"
        env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "S3_BUCKET")}
        env |= moto_environ(moto_server) | {SECRET_ENV: secret}
        overrides = [
            f"tracking.uri={cfg.tracking.uri}",
            f"tracking.experiment={cfg.tracking.experiment}",
            f"storage.uri={cfg.storage.uri}",
            f"registry.model_name={cfg.registry.model_name}",
            f"webhook.reconcile_s={cfg.webhook.reconcile_s}",
        ]
        process, url = start_receiver(overrides, env, log)
        name = f"test-{cfg.registry.model_name}"
        hook = register_webhook(cfg.tracking, cfg.webhook, url, secret, name=name) if register else None
        receiver = WebhookReceiver(url, secret, hook.webhook_id if hook else "", process, log)
        started.append((receiver, MlflowClient(str(cfg.tracking.uri))))
        return receiver

    yield start
    for receiver, client in started:
        if receiver.webhook_id:
            client.delete_webhook(receiver.webhook_id)
        stop_receiver(receiver.process)


# ---- Batch scoring (tests/code/test_predict*.py): a registered version with a bundle, and AG News rows to score ----

SCORING_ROWS = 10_000


@pytest.fixture(scope="session")
def registered_tiny(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The tiny random model (preset=test) uploaded, trained and registered as @champion of its model name (gate
    opened) in a local SQLite store, and mirrored to local storage: returns the overrides that reach it."""
    return register_trained(tmp_path_factory.mktemp("registered-tiny"), "preset=test")


def upload_and_train(root: Path, *overrides: str) -> list[str]:
    """Upload AG News and train with ``overrides`` in a SQLite store and local storage under ``root`` (in this
    process): returns the overrides that reach them."""
    from agnews.tracking import step_run
    from agnews.training import train as train_model
    from agnews.upload import upload_and_log

    settings_overrides = [
        f"tracking.uri=sqlite:///{root / 'mlflow' / 'mlflow.db'}",
        f"storage.uri={root / 'store'}",
        f"train.output_dir={root / 'checkpoints'}",
        f"data.source={require_agnews()}",
        *overrides,
    ]
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.delenv("S3_BUCKET", raising=False)
        settings = compose(settings_overrides)
        with step_run(settings, "upload"):
            upload_and_log(settings)
        with step_run(settings, "train"):
            train_model(settings)
    return settings_overrides


def register_trained(root: Path, *train: str) -> list[str]:
    """Upload, train with ``train`` overrides and register as @champion (gate opened) in a SQLite store under
    ``root``, mirrored to local storage there: returns the overrides that reach it."""
    from agnews.promotion.register import register
    from agnews.tracking import step_run

    overrides = upload_and_train(root, *train, "registry.min_accuracy=0", "registry.min_behaviour_pass_rate=0")
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        patch.delenv("S3_BUCKET", raising=False)
        settings = compose(overrides)
        with step_run(settings, "register"):
            verdict = register(settings.registry, settings.storage, settings.tracking.experiment)
    assert verdict.version == 1
    return overrides


@pytest.fixture
def scoring(registered_tiny: list[str], monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """``registered_tiny``'s overrides for the predict step: rows kept by ``id``, no progress bar."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("S3_BUCKET", raising=False)
    return [*registered_tiny, "predict.keep_columns=[id]", "predict.progress=false"]


@pytest.fixture(scope="session")
def agnews_rows(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first SCORING_ROWS rows of AG News' train split as parquet: ``id`` and ``text`` (title and description)."""
    import pandas as pd

    from agnews.data import parse_csv

    texts = parse_csv(require_agnews() / "train.csv", 4).text.head(SCORING_ROWS)
    path = tmp_path_factory.mktemp("agnews-rows") / "rows.parquet"
    pd.DataFrame({"id": range(len(texts)), "text": texts}).to_parquet(path)
    return path
