"""Shared fixtures: the real AG News copy, a moto S3 server over HTTP, a real `mlflow server`, composed configs."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
import requests
from moto.server import ThreadedMotoServer
from omegaconf import DictConfig

from agnews.config import compose
from tests.helpers import answers, free_port, moto_environ, require_agnews


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--model-uri",
        help="the MLflow model that tests/model checks, e.g. models:/distilbert-agnews@champion",
    )
    parser.addoption(
        "--min-pass-rate",
        type=float,
        help="tests/model: the pass rate each kind of behavioural check needs (default: the gate's)",
    )


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


@pytest.fixture
def make_cfg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Compose the config with local storage and tracking under tmp_path, plus any overrides."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("S3_BUCKET", raising=False)

    def make(*overrides: str) -> DictConfig:
        return compose(
            [
                f"storage.uri={tmp_path / 'store'}",
                f"tracking.uri=sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}",
                f"train.output_dir={tmp_path / 'checkpoints'}",
                *overrides,
            ]
        )

    return make


# Seconds that `mlflow server` may take to create its SQLite schema and answer /health.
MLFLOW_SERVER_START_S = 120


@pytest.fixture(scope="session")
def mlflow_server(moto_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` subprocess on 127.0.0.1: SQLite backend, artifacts proxied to S3 on the moto server.

    Yields the tracking URI. Clients reach artifacts through the server (mlflow-artifacts:/), so they need no
    S3 settings of their own; the server's log is in its tmp folder.
    """
    root = tmp_path_factory.mktemp("mlflow-server")
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "AWS_SESSION_TOKEN", "AWS_PROFILE")}
    env |= moto_environ(moto_server)
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
            *(sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"),
            *("--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}"),
            *("--artifacts-destination", f"s3://{bucket}/mlartifacts"),
        ],
        env=env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: the server and the workers it starts stop together
    )
    deadline = time.monotonic() + MLFLOW_SERVER_START_S
    while not answers(f"{uri}/health"):
        if server.poll() is not None or time.monotonic() > deadline:
            os.killpg(server.pid, signal.SIGKILL)
            pytest.fail(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    yield uri
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
    log_file.close()


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
