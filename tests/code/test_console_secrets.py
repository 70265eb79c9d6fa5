"""No password on the console: a step given a tracking store or study storage that it cannot reach, or whose URI is
malformed, says so in one redacted line (``error: ...``, exit status 1), whatever the password holds.

The steps run in processes of their own, as a user runs them, against a PostgreSQL URI whose port nothing listens on
(a closed port of 127.0.0.1 needs no server)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import pytest

from agnews.config import command, entrypoint, redact, without_credentials
from agnews.database import database_url, tracking_store
from agnews.errors import ConfigError, TrackingError
from agnews.settings import Settings
from tests.helpers import STEP_UNSET, free_port, run_step

# Every character that a password may hold unencoded, the user info ending at the last '@' before the host; a raw
# '@' makes the URI malformed for SQLAlchemy, which ends the password at the first one. Hydra's override grammar
# takes all but '#' unquoted: the overrides use HYDRA_PASSWORD, the environment and argparse PASSWORD.
PASSWORD = "Kq7:Zx9/Wv3#Jm5?"
HYDRA_PASSWORD = PASSWORD.replace("#", "")
TAIL = "Tail9q"  # what follows a raw '@' in the password


def pieces(password: str) -> list[str]:
    """The password and its pieces on either side of each separator: none may reach the console."""
    words = [password, quote(password, safe="")]
    for separator in ":/#?@":
        words += [piece for word in list(words) for piece in word.split(separator) if len(piece) >= 3]
    return sorted(set(words))


# A test that runs a step in a process of its own takes seconds: make test-fast leaves it out.
in_a_process = pytest.mark.integration


def closed_postgres(password: str) -> str:
    """A PostgreSQL URI with ``password`` as written (unencoded) whose port on 127.0.0.1 nothing listens on."""
    return f"postgresql+psycopg2://agnews:{password}@127.0.0.1:{free_port()}/mlflow"


def one_redacted_line(done: subprocess.CompletedProcess[str], password: str) -> str:
    """The step's only line, once checked: exit status 1, one line that starts with ``error:``, no piece of the
    password in stdout or stderr."""
    output = done.stdout + done.stderr
    leaked = [word for word in pieces(password) if word in output]
    assert not leaked, f"{leaked} in:\n{output[-3000:]}"
    assert done.returncode == 1, output[-3000:]
    lines = output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), output[-3000:]
    return lines[0]


@in_a_process
@pytest.mark.parametrize("password", [HYDRA_PASSWORD, f"{HYDRA_PASSWORD}@{TAIL}"], ids=["separators", "raw-at"])
def test_cleanup_on_an_unreachable_postgresql_tracking_store_says_one_redacted_line(
    password: str, tmp_path: Path
) -> None:
    line = one_redacted_line(run_step("cleanup", f"tracking.uri={closed_postgres(password)}", cwd=tmp_path), password)
    assert "postgresql+psycopg2://***@127.0.0.1:" in line


@in_a_process
def test_a_tracking_store_in_the_environment_is_redacted_too(tmp_path: Path) -> None:
    env = {key: value for key, value in os.environ.items() if key not in STEP_UNSET}
    env["MLFLOW_TRACKING_URI"] = closed_postgres(PASSWORD)
    line = one_redacted_line(run_step("cleanup", cwd=tmp_path, env=env), PASSWORD)
    assert "postgresql+psycopg2://***@127.0.0.1:" in line


@in_a_process
def test_an_override_that_hydra_cannot_parse_is_echoed_redacted(tmp_path: Path) -> None:
    """An unquoted '#' is outside Hydra's override grammar: its error echoes the override, without the password."""
    line = one_redacted_line(run_step("cleanup", f"tracking.uri={closed_postgres(PASSWORD)}", cwd=tmp_path), PASSWORD)
    assert "tracking.uri=postgresql+psycopg2://***@127.0.0.1:" in line


@in_a_process
def test_tune_on_an_unreachable_postgresql_tracking_store_says_one_redacted_line(tmp_path: Path) -> None:
    done = run_step(
        "tune",
        f"tracking.uri={closed_postgres(HYDRA_PASSWORD)}",
        f"tune.storage=sqlite:///{tmp_path / 'optuna.db'}",
        f"tune.recipe_dir={tmp_path}",
        cwd=tmp_path,
    )
    assert "postgresql+psycopg2://***@127.0.0.1:" in one_redacted_line(done, HYDRA_PASSWORD)


@in_a_process
@pytest.mark.parametrize("password", [HYDRA_PASSWORD, f"{HYDRA_PASSWORD}@{TAIL}"], ids=["separators", "raw-at"])
def test_tune_on_an_unreachable_postgresql_study_storage_says_one_redacted_line(password: str, tmp_path: Path) -> None:
    done = run_step(
        "tune",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"tune.storage={closed_postgres(password)}",
        f"tune.recipe_dir={tmp_path}",
        cwd=tmp_path,
    )
    assert "tune.storage=postgresql+psycopg2://***@127.0.0.1:" in one_redacted_line(done, password)


@in_a_process
def test_webhook_unregister_through_an_unreachable_database_says_one_redacted_line(tmp_path: Path) -> None:
    password = f"{PASSWORD}@{TAIL}"
    done = run_step("webhook", "unregister", "--backend-store-uri", closed_postgres(password), cwd=tmp_path)
    assert "postgresql+psycopg2://***@127.0.0.1:" in one_redacted_line(done, password)


@in_a_process
@pytest.mark.parametrize(
    "uri",
    [
        f"postgresql+psycopg2://agnews:{HYDRA_PASSWORD}@127.0.0.1:port/mlflow",  # a port that is not a number
        f"http://agnews:{HYDRA_PASSWORD}@127.0.0.1:port/",
        f"nosuchdb://agnews:{HYDRA_PASSWORD}@127.0.0.1:5432/mlflow",  # a scheme that no store or database has
    ],
    ids=["postgresql-port", "http-port", "scheme"],
)
def test_a_malformed_tracking_uri_is_named_malformed_in_one_redacted_line(uri: str, tmp_path: Path) -> None:
    line = one_redacted_line(run_step("cleanup", f"tracking.uri={uri}", cwd=tmp_path), HYDRA_PASSWORD)
    assert "malformed URI" in line and "no tracking server" not in line
    assert redact(uri) in line


@in_a_process
def test_a_malformed_study_storage_and_backend_store_uri_are_named_malformed(tmp_path: Path) -> None:
    uri = f"postgresql+psycopg2://agnews:{HYDRA_PASSWORD}@127.0.0.1:port/optuna"
    done = run_step(
        "tune",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"tune.storage={uri}",
        f"tune.recipe_dir={tmp_path}",
        cwd=tmp_path,
    )
    assert "malformed URI" in one_redacted_line(done, HYDRA_PASSWORD)
    uri = uri.replace(HYDRA_PASSWORD, PASSWORD)
    done = run_step("webhook", "unregister", "--backend-store-uri", uri, cwd=tmp_path)
    assert "malformed URI" in one_redacted_line(done, PASSWORD)


# --- in this process: the redaction that the entry points go through ---


@pytest.mark.parametrize(
    ("uri", "why"),
    [
        (f"postgresql+psycopg2://agnews:{PASSWORD}@{TAIL}@db:5432/mlflow", "raw '@'"),
        (f"postgresql+psycopg2://agnews:{PASSWORD}@db:port/mlflow", "port is not a number"),
        (f"mysql://agnews:{PASSWORD}@db:99999/mlflow", "port is not a number"),
        (f"nosuchdb://agnews:{PASSWORD}@db/mlflow", "no database has the scheme 'nosuchdb'"),
        ("not a url", "not of the form"),
    ],
)
def test_a_malformed_database_uri_is_refused_without_its_password(uri: str, why: str) -> None:
    with pytest.raises(ConfigError) as caught:
        database_url("tune.storage", uri)
    message = str(caught.value)
    assert message.startswith(f"tune.storage={redact(uri)}: malformed URI: ") and why in message
    assert not [word for word in pieces(f"{PASSWORD}@{TAIL}") if word in message]


def test_a_database_uri_with_every_other_separator_in_its_password_is_taken() -> None:
    url = database_url("tune.storage", f"postgresql+psycopg2://agnews:{PASSWORD}@db:5432/optuna")
    assert (url.username, url.password, url.host, url.port) == ("agnews", PASSWORD, "db", 5432)
    assert tracking_store(f"http://agnews:{PASSWORD}@host:5000") is None
    assert tracking_store("mlruns") is None


def test_credentials_with_raw_separators_leave_an_http_tracking_uri() -> None:
    assert without_credentials(f"http://agnews:{PASSWORD}@host:5000/") == ("http://host:5000/", ("agnews", PASSWORD))


def test_an_unexpected_error_is_printed_redacted_without_hydras_echo(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], kept_logging: None
) -> None:
    """A Hydra step whose task fails with other than a PipelineError: its traceback, redacted, and no "Error executing
    job with overrides" line, which echoes the overrides as given."""
    uri = f"postgresql+psycopg2://agnews:{HYDRA_PASSWORD}@db:5432/mlflow"

    def task(cfg: Settings) -> None:
        raise RuntimeError(f"cannot open {cfg.tracking.uri}")

    # hydra/job_logging=none: the step configures no logging in this process (its handlers would outlive capsys)
    monkeypatch.setattr(sys, "argv", ["step", "hydra/job_logging=none", f"tracking.uri={uri}"])
    with pytest.raises(SystemExit) as caught:
        entrypoint(task)()
    err = capsys.readouterr().err
    assert caught.value.code == 1
    assert f"RuntimeError: cannot open {redact(uri)}" in err and "Traceback" in err
    assert "Error executing job" not in err
    assert not [word for word in pieces(HYDRA_PASSWORD) if word in err]


def test_a_pipeline_error_and_the_log_records_are_redacted(
    caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    """What a library logs (MLflow's retries quote the URI) and the error line hold no password."""
    uri = f"postgresql+psycopg2://agnews:{PASSWORD}@db:5432/mlflow"

    @command
    def main() -> None:
        logging.getLogger("mlflow.store.db.utils").warning("cannot create the engine for %s: retrying", uri)
        try:
            raise OSError(f"no route to {uri}")
        except OSError:
            logging.getLogger("urllib3").exception("connection to %s failed", uri)
        raise TrackingError(f"no tracking store at {uri}")

    with caplog.at_level(logging.WARNING), pytest.raises(SystemExit):
        main()
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == f"error: no tracking store at {redact(uri)}"  # MLflow's handler writes above
    logged = caplog.text
    assert f"cannot create the engine for {redact(uri)}" in logged and f"OSError: no route to {redact(uri)}" in logged
    assert not [word for word in pieces(PASSWORD) if word in err + logged], err + logged
