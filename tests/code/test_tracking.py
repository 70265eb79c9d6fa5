"""The tracking connection: relative SQLite URIs resolve as MLflow resolves them; credentials in the URI stay out
of runs and logs, against a real `mlflow server --app-name basic-auth`."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import mlflow
import pytest
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from agnews.config import PROJECT_ROOT, redact
from agnews.errors import DataError, RegistryError, TrackingError
from agnews.promotion.registry import get_run
from agnews.tracking import connect, step_run
from agnews.upload import upload_and_log
from tests.helpers import answers, free_port, run_step


def test_relative_sqlite_uri_resolves_against_the_current_folder(
    tmp_path: Path, make_cfg, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`sqlite:///mlflow/mlflow.db`, the README's form for `mlflow ui`, is mlflow/mlflow.db below the current folder."""
    monkeypatch.chdir(tmp_path)
    cfg = make_cfg("tracking.uri=sqlite:///mlflow/mlflow.db", "tracking.experiment=relative")
    with step_run(cfg, "upload") as run:
        experiment = mlflow.get_experiment(run.info.experiment_id)
    assert (tmp_path / "mlflow" / "mlflow.db").is_file()
    assert experiment.artifact_location == (tmp_path / "mlflow" / "artifacts").as_uri()
    # the same store, opened as `mlflow ui --backend-store-uri sqlite:///mlflow/mlflow.db` opens it from this folder
    assert mlflow.MlflowClient("sqlite:///mlflow/mlflow.db").get_run(run.info.run_id).data.tags["step"] == "upload"


def test_a_step_that_fails_on_bad_input_leaves_its_failed_run_tagged_with_the_error(tmp_path: Path, make_cfg) -> None:
    """The upload step's run, as steps/upload.py opens it, on a source that does not exist: FAILED, and its ``error``
    tag is the one line the step reports."""
    missing = tmp_path / "no-such-folder"
    cfg = make_cfg(f"data.source={missing}")
    with pytest.raises(DataError) as error, step_run(cfg, "upload") as run:
        upload_and_log(cfg)
    failed = MlflowClient().get_run(run.info.run_id)
    assert failed.info.status == "FAILED"
    assert failed.data.tags["error"] == f"DataError: {error.value}"
    assert str(missing) in failed.data.tags["error"] and "\n" not in failed.data.tags["error"]


# --- credentials in MLFLOW_TRACKING_URI, against a real `mlflow server --app-name basic-auth` ---

# Seconds that `mlflow server` may take to start (as for the conftest's server).
SERVER_START_S = 120
ADMIN, PASSWORD = "admin", "agnews-Secret:pass@1"  # the basic-auth app wants 12 characters or more


def start_basic_auth_server(root: Path) -> tuple[subprocess.Popen, str]:
    """`mlflow server --app-name basic-auth` on 127.0.0.1 with a SQLite store and the admin ADMIN/PASSWORD."""
    (root / "basic_auth.ini").write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{root / 'basic_auth.db'}\nadmin_username = {ADMIN}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | {
        "MLFLOW_AUTH_CONFIG_PATH": str(root / "basic_auth.ini"),
        "MLFLOW_AUTH_ADMIN_PASSWORD": PASSWORD,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": uuid.uuid4().hex,
    }
    port = free_port()
    server = subprocess.Popen(
        [
            *(sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth", "--workers", "1"),
            *("--host", "127.0.0.1", "--port", str(port), "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}"),
            *("--artifacts-destination", str(root / "artifacts")),
        ],
        env=env,
        stdout=(root / "server.log").open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + SERVER_START_S
    while not answers(f"{uri}/health"):
        if server.poll() is not None or time.monotonic() > deadline:
            os.killpg(server.pid, signal.SIGKILL)
            pytest.fail(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    return server, uri


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server, uri = start_basic_auth_server(tmp_path_factory.mktemp("mlflow-basic-auth"))
    yield uri
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout=30)


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("http://user:pass@host:5000", "http://***@host:5000"),
        ("https://user:p@ss:w0rd@host/mlflow", "https://***@host/mlflow"),  # "@" and ":" in the password
        ("postgresql://mlflow:secret@db:5432/mlflow", "postgresql://***@db:5432/mlflow"),
        ("http://host:5000/path@v1", "http://host:5000/path@v1"),  # an '@' after the host is not user info
        ("http://user@host/path@v1", "http://***@host/path@v1"),
        ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
        # unencoded '/', '#' and '?' in the password: the user info ends at the last '@' before the host
        ("http://user:pa/ss@host", "http://***@host"),
        ("postgresql+psycopg2://postgres:s/e#c?r@t@db:5432/mlflow", "postgresql+psycopg2://***@db:5432/mlflow"),
        (
            "at postgresql://u:p/w@db/mlflow, then http://a:b#c@h/x.",
            "at postgresql://***@db/mlflow, then http://***@h/x.",
        ),
    ],
)
def test_redact_hides_the_user_info_of_a_uri(text: str, shown: str) -> None:
    assert redact(text) == shown


def test_a_missing_run_names_the_tracking_store_without_its_password(
    postgres: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """registry's "no run" error prints the tracking URI: a PostgreSQL URI's password (here with an unencoded '/',
    which SQLAlchemy accepts; the test cluster trusts any password) stays out of it."""
    uri = postgres.replace("postgres@", "postgres:pa/ss@", 1)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # an earlier test's mlflow.set_tracking_uri() would win over the variable: set it here, and put it back after
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        with pytest.raises(RegistryError) as caught:
            get_run(MlflowClient(), "f00d")
    finally:
        mlflow.set_tracking_uri(previous)
    assert str(caught.value) == f"no run 'f00d' in the tracking store at {postgres.replace('postgres@', '***@', 1)}"


def test_credentials_in_the_tracking_uri_stay_out_of_runs_and_logs(auth_server: str, tmp_path: Path) -> None:
    """`MLFLOW_TRACKING_URI=http://user:password@host` authenticates the step, and the password appears in no
    parameter, no config.yaml, no log line of the step and no "View run" line of MLflow's."""
    source = tmp_path / "source"
    source.mkdir()
    for split in ("train", "test"):
        (source / f"{split}.jsonl").write_text(json.dumps({"text": f"a {split} text", "label": 1}) + "\n")
    host = auth_server.removeprefix("http://")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_") and k != "S3_BUCKET"}
    env |= {"MLFLOW_TRACKING_URI": f"http://{ADMIN}:{quote(PASSWORD, safe='')}@{host}", "PYTHONPATH": str(PROJECT_ROOT)}
    done = run_step(
        "upload", f"data.source={source}", f"storage.uri={tmp_path / 'store'}", check=True, cwd=tmp_path, env=env
    )
    output = done.stdout + done.stderr
    # MLflow is given the URI without its user info (the credentials travel in MLFLOW_TRACKING_USERNAME/PASSWORD),
    # and the config, which reads MLFLOW_TRACKING_URI, records that URI
    assert f"in experiment 'agnews' at http://{host}\n" in output  # the step's own line
    assert f"View run upload at: http://{host}/#/experiments/" in output  # MLflow's own line
    assert quote(PASSWORD, safe="") not in output and PASSWORD not in output
    run, config = logged_run(auth_server, tmp_path)
    assert run.data.params["tracking.uri"] == f"http://{host}"
    assert not [key for key, value in run.data.params.items() if "Secret" in value]
    assert f"uri: http://{host}\n" in config and "Secret" not in config


def test_credentials_in_a_tracking_uri_override_are_redacted(
    auth_server: str, make_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog, capsys
) -> None:
    """`tracking.uri=http://user:password@host` on the command line: the run records and the logs show
    `http://***@host`."""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(name, "")  # restored after the test: connect() sets them
    caplog.set_level(logging.INFO, logger="agnews")
    host = auth_server.removeprefix("http://")
    cfg = make_cfg(f"tracking.uri=http://{ADMIN}:{quote(PASSWORD, safe='')}@{host}", "tracking.experiment=override")
    with step_run(cfg, "register"):
        pass
    output = caplog.text + capsys.readouterr().out
    assert f"in experiment 'override' at http://***@{host}" in caplog.text
    assert f"View run register at: http://{host}/#/experiments/" in output
    assert "Secret" not in output
    run, config = logged_run(auth_server, tmp_path, "override")
    assert run.data.params["tracking.uri"] == f"http://***@{host}"
    assert f"uri: http://***@{host}\n" in config and "Secret" not in config
    assert not [key for key, value in run.data.params.items() if "Secret" in value]


def logged_run(uri: str, tmp_path: Path, experiment: str = "agnews") -> tuple[Run, str]:
    """The one run in ``experiment`` on the basic-auth server, and its config.yaml, read as the admin."""
    client = MlflowClient(uri)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN)
        patch.setenv("MLFLOW_TRACKING_PASSWORD", PASSWORD)
        (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
        config = Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))).read_text()
    return run, config


def test_an_unauthenticated_client_is_refused_in_one_line(
    auth_server: str, make_cfg, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without credentials the server answers 401, and the step says so before any work."""
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(TrackingError, match=rf"^MLflow at {auth_server} refused experiment 'agnews': .*401"):
        connect(make_cfg(f"tracking.uri={auth_server}").tracking)
