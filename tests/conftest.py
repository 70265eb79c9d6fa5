"""Shared fixtures: the real AG News copy, a moto S3 server over HTTP, and composed configs."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from moto.server import ThreadedMotoServer
from omegaconf import DictConfig

from steps.config import PROJECT_ROOT, compose

# The one setting that finds the real AG News files (see ../shared/data/ag_news/SOURCES.md).
AGNEWS_DIR = Path(os.environ.get("AGNEWS_DIR", PROJECT_ROOT.parent / "shared" / "data" / "ag_news"))


def require_agnews() -> Path:
    """The AG News folder; skipped where it is absent, but a failure under CI."""
    if not (AGNEWS_DIR / "test.csv").is_file():
        message = f"AG News not found at {AGNEWS_DIR} (set AGNEWS_DIR)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return AGNEWS_DIR


@pytest.fixture(scope="session")
def agnews_dir() -> Path:
    return require_agnews()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
    for name, value in {
        "S3_ENDPOINT_URL": moto_server,
        "MLFLOW_S3_ENDPOINT_URL": moto_server,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
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
