"""The Docker path: MLproject's docker_env, the image from ./Dockerfile, and `mlflow run . -e main` and `-e tune` in a
real engine, `main` also as the README's "Docker and `mlflow run`" sequence writes it, against the Compose server.

The container tests (`make test-container`) need an engine behind DOCKER_HOST: `eval "$(.ci/container-setup)"`
gives one (Podman) and a local base image (AGNEWS_BASE_IMAGE). Without one they are skipped, and under CI they fail.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import boto3
import docker
import mlflow
import pytest
from mlflow.entities import Run
from mlflow.projects._project_spec import load_project
from mlflow.projects.backend.local import _get_docker_command
from mlflow.tracking import MlflowClient

from agnews.config import PROJECT_ROOT, compose
from agnews.upload import upload
from bundle.layout import manifest_key
from tests.helpers import (
    ENV_EXAMPLE,
    FILLED,
    checkout,
    read_env,
    readme_sequence,
    run_as_written,
    unavailable,
    write_env,
)

PROJECT = load_project(str(PROJECT_ROOT))
IMAGE = PROJECT.docker_env["image"]
FORWARDED = [name for name, _ in PROJECT.docker_env["environment"]]
ENTRYPOINT = PROJECT_ROOT / "container" / "entrypoint.sh"
WHEELS = PROJECT_ROOT / "container" / "wheels"
# What the image must hold exactly as in the work tree.
CODE = ["MLproject", "steps/*.py", "agnews/*.py", "bundle/*.py", "conf/*.yaml", "conf/*/*.yaml"]
BUILD_TIMEOUT_S = 1200
RUN_TIMEOUT_S = 900
# Where the README's Compose server listens, and the address its `mlflow run` logs to.
COMPOSE_SERVER = ("127.0.0.1", 5000)


def bash_words(command: list[str]) -> list[str]:
    """The words that bash makes of MLflow's docker command, joined with spaces as MLflow runs it."""
    printed = subprocess.run(
        ["bash", "-c", "printf '%s\\0' " + " ".join(command)], capture_output=True, text=True, check=True
    )
    return printed.stdout.split("\0")[:-1]


def test_docker_env_forwards_set_variables_and_drops_unset_ones(
    tmp_path: Path, mlflow_db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MLflow's own `docker run` command for this MLproject, expanded by bash, then the image's entrypoint."""
    for name in FORWARDED:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "a/b+c d*")  # one word, whatever the characters
    shutil.copy(mlflow_db, tmp_path / "mlflow.db")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    with mlflow.start_run(experiment_id="0") as run:  # MLflow raised here for any unset variable listed by bare name
        command = _get_docker_command(
            SimpleNamespace(tags=[IMAGE]), run, user_env_vars=PROJECT.docker_env["environment"]
        )
    words = bash_words(command)
    assert "a/b+c d*" not in " ".join(command), "a secret's value would show in MLflow's log"
    passed = dict(word.split("=", 1) for flag, word in itertools.pairwise(words) if flag == "-e")
    assert passed["AWS_REGION"] == "eu-west-1"
    assert passed["AWS_SECRET_ACCESS_KEY"] == "a/b+c d*"
    assert passed["AWS_SESSION_TOKEN"] == ""

    seen = subprocess.run(
        ["env", "-i", *(f"{k}={v}" for k, v in passed.items()), str(ENTRYPOINT), "env"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert "AWS_REGION=eu-west-1" in seen
    assert "AWS_SECRET_ACCESS_KEY=a/b+c d*" in seen
    assert not any(line.split("=")[0] in ("AWS_SESSION_TOKEN", "MLFLOW_S3_ENDPOINT_URL") for line in seen)


def require_engine() -> None:
    """Skip where no container engine answers at DOCKER_HOST; under CI, fail."""
    try:
        docker.from_env().ping()
    except docker.errors.DockerException as exc:
        message = (
            f"no container engine at {os.environ.get('DOCKER_HOST', 'the default socket')} ({exc}); "
            'run `eval "$(.ci/container-setup)"`'
        )
        unavailable(message)


def torch_build_args() -> list[str]:
    """Offline torch: the CPU wheel that pip finds on this disk (its find-links), else the default CPU index."""
    pin = next(
        line for line in (PROJECT_ROOT / "requirements.txt").read_text().splitlines() if line.startswith("torch==")
    )
    found = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-index", pin, "-d", str(WHEELS)],
        capture_output=True,
        check=False,
    )
    return ["--build-arg", "TORCH_INDEX_URL="] if found.returncode == 0 else []


@pytest.fixture(scope="session")
def image(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The project's image, built from ./Dockerfile and the work tree now (AGNEWS_BASE_IMAGE as the base, if set)."""
    require_engine()
    base = os.environ.get("AGNEWS_BASE_IMAGE")
    build = [
        *("docker", "build", "--network", "host", "--tag", IMAGE),
        *(["--build-arg", f"BASE_IMAGE={base}"] if base else []),
        *torch_build_args(),
        str(PROJECT_ROOT),
    ]
    log = tmp_path_factory.mktemp("image") / "build.log"
    with log.open("wb") as out:
        done = subprocess.run(build, stdout=out, stderr=subprocess.STDOUT, timeout=BUILD_TIMEOUT_S, check=False)
    assert done.returncode == 0, f"{' '.join(build)} failed:\n{log.read_text()[-3000:]}"
    return IMAGE


def sha256_lines(listing: str) -> dict[str, str]:
    return {name: digest for digest, name in (line.split() for line in listing.splitlines())}


@pytest.mark.container
def test_image_holds_the_work_tree_code(image: str) -> None:
    """`mlflow run .` runs the image as built: what it holds is the work tree's code, and it runs as non-root."""
    listing = subprocess.run(
        ["docker", "run", "--rm", image, "sh", "-c", f"id -u && sha256sum {' '.join(CODE)}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    uid, _, hashes = listing.partition("\n")
    local = {
        str(path.relative_to(PROJECT_ROOT)): hashlib.sha256(path.read_bytes()).hexdigest()
        for pattern in CODE
        for path in sorted(PROJECT_ROOT.glob(pattern))
    }
    assert uid != "0"
    assert sha256_lines(hashes) == local


def main_run(client: MlflowClient) -> tuple[Run, dict[str, Run]]:
    """The one `main` run of experiment agnews, which `mlflow run` ran in the image, and its child runs by step."""
    experiment = client.get_experiment_by_name("agnews").experiment_id
    (parent,) = client.search_runs([experiment], "tags.`mlflow.project.entryPoint` = 'main'")
    assert parent.info.status == "FINISHED"
    assert (parent.data.tags["step"], parent.data.tags["mlflow.project.env"]) == ("main", "docker")
    children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    # Podman 4.3 (Debian 12) loses the exit code of `docker run --rm`, so a failed step can look like a success
    # to `mlflow run`: the child runs tell.
    assert all(run.info.status == "FINISHED" for run in children)
    return parent, {run.data.tags["step"]: run for run in children}


@pytest.mark.container
def test_mlflow_run_main_in_a_container(image: str, mlflow_server: str, bucket: str, agnews_dir: Path) -> None:
    """`mlflow run . -e main` in the image: nested runs on the server, @champion, the mirror in the bucket."""
    # s3_env (under `bucket`) set the moto endpoint and dummy keys, and unset AWS_SESSION_TOKEN: docker_env forwards
    # them all, S3_BUCKET included, so the container's storage.uri is s3://<bucket>.
    env = os.environ | {"MLFLOW_TRACKING_URI": mlflow_server, "S3_BUCKET": bucket}
    overrides = (
        "registry.min_accuracy=0 registry.min_behaviour_pass_rate=0 data.val_size=200 data.test_size=200 "
        "train.batch_size=16"
    )
    run = [
        *(sys.executable, "-m", "mlflow", "run", str(PROJECT_ROOT), "-e", "main", "--experiment-name", "agnews"),
        *("-A", "network=host", "-A", f"volume={agnews_dir}:/data/ag_news:ro"),
        *("-P", "source=/data/ag_news", "-P", "model=tiny", "-P", "sample_size=200", "-P", "epochs=1"),
        *("-P", f"overrides={overrides}"),
    ]
    done = subprocess.run(run, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]

    client = MlflowClient(mlflow_server)
    parent, steps = main_run(client)
    tags = parent.data.tags
    assert tags["mlflow.docker.image.uri"] == image
    assert sorted(steps) == ["register", "train", "upload"], done.stderr[-5000:]
    assert {step: tags[f"child.{step}"] for step in steps} == {s: r.info.run_id for s, r in steps.items()}

    model_name = compose().registry.model_name
    champion = client.get_model_version_by_alias(model_name, "champion")
    assert champion.run_id == steps["train"].info.run_id
    assert (tags["registered_version"], tags["registered_alias"]) == (champion.version, "champion")

    s3 = boto3.client("s3", endpoint_url=os.environ["S3_ENDPOINT_URL"])
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]}
    pointer = json.loads(s3.get_object(Bucket=bucket, Key=f"models/{model_name}/champion.json")["Body"].read())
    manifest = s3.get_object(Bucket=bucket, Key=f"models/{model_name}/{pointer['manifest']}")["Body"].read()
    # the version's folder is named by its number and its manifest's digest
    assert (pointer["version"], pointer["manifest"]) == (
        int(champion.version),
        manifest_key(int(champion.version), hashlib.sha256(manifest).hexdigest()),
    )
    folder = f"models/{model_name}/{pointer['manifest'].rsplit('/', 1)[0]}"
    files = ["model.int8.onnx", "tokenizer.json", "config.json", "manifest.json"]
    assert {f"{folder}/{name}" for name in files} <= keys
    assert {f"datasets/ag_news/{name}" for name in ("train.jsonl", "test.jsonl", "info.json")} <= keys


@pytest.mark.container
def test_mlflow_run_tune_in_a_container(image: str, mlflow_server: str, bucket: str, agnews_dir: Path) -> None:
    """`mlflow run . -e tune` in the image, on data already uploaded: one parent run with a child run per trial,
    then the winner's re-train, registered through the gate and mirrored into the bucket."""
    model_name = f"tune-{bucket[-8:]}"
    cfg = compose([f"storage.uri=s3://{bucket}", f"data.source={agnews_dir}"])
    upload(cfg.data, cfg.storage)
    env = os.environ | {"MLFLOW_TRACKING_URI": mlflow_server, "S3_BUCKET": bucket}
    overrides = (
        f"preset=test registry=open registry.model_name={model_name} tune.study={model_name} "
        "tune.storage=sqlite:////tmp/optuna.db tune.startup_trials=2 model.search.epochs={low:1,high:1}"
    )
    run = [
        *(sys.executable, "-m", "mlflow", "run", str(PROJECT_ROOT), "-e", "tune", "--experiment-name", "agnews"),
        *("-A", "network=host", "-P", "model=tiny", "-P", "sample_size=160", "-P", "trials=2"),
        *("-P", f"overrides={overrides}"),
    ]
    done = subprocess.run(run, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("agnews").experiment_id
    (parent,) = client.search_runs([experiment], f"tags.`tune.study` = '{model_name}' and tags.step = 'tune'")
    assert (parent.info.status, parent.data.tags["mlflow.project.entryPoint"]) == ("FINISHED", "tune")
    assert parent.data.tags["mlflow.docker.image.uri"] == image
    children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    trials = sorted(int(run.data.tags["trial.number"]) for run in children if run.data.tags["step"] == "tune-trial")
    assert trials == [0, 1], done.stderr[-5000:]
    # the image's code tree is read-only to its user: the recipe is the parent run's artifact, and the step says so
    assert f"{model_name}.yaml" in {artifact.path for artifact in client.list_artifacts(parent.info.run_id)}
    assert f"it is the run's artifact {model_name}.yaml" in done.stdout + done.stderr
    champion = client.get_model_version_by_alias(model_name, "champion")
    assert champion.run_id == parent.data.tags["child.train"]
    assert champion.run_id in {run.info.run_id for run in children}
    s3 = boto3.client("s3", endpoint_url=os.environ["S3_ENDPOINT_URL"])
    pointer = json.loads(s3.get_object(Bucket=bucket, Key=f"models/{model_name}/champion.json")["Body"].read())
    assert pointer["version"] == int(champion.version)


def require_free(address: tuple[str, int]) -> None:
    """Fail, naming what to stop, where something already listens at ``address``."""
    with socket.socket() as sock:
        try:
            sock.bind(address)
        except OSError as exc:
            pytest.fail(f"{address[0]}:{address[1]} is in use ({exc.strerror}): stop what listens there first")


@pytest.mark.container
def test_readme_mlflow_run_as_written(image: str, tmp_path: Path) -> None:
    """The README's `mlflow run` sequence, as written, in a checkout whose .env is filled in as .env.example asks
    (the credentials, and APP_UID/APP_GID as the user running it): the Compose server on 127.0.0.1:5000 holds a
    finished `main` run, its three steps, and @champion on its train run. Compose's server is stopped afterwards."""
    require_free(COMPOSE_SERVER)
    root = checkout(tmp_path)
    write_env(
        root / ".env", read_env(ENV_EXAMPLE) | FILLED | {"APP_UID": str(os.getuid()), "APP_GID": str(os.getgid())}
    )
    try:
        with run_as_written(readme_sequence("mlflow-run"), root) as done:
            output = done.output()
        assert done.returncode == 0, output[-5000:]

        host, port = COMPOSE_SERVER
        client = MlflowClient(f"http://{host}:{port}")
        parent, steps = main_run(client)
        assert sorted(steps) == ["register", "train", "upload"], output[-5000:]
        assert parent.data.params["source"] == "/data/ag_news"  # the mounted copy, not the Hub
        champion = client.get_model_version_by_alias(compose().registry.model_name, "champion")
        assert champion.run_id == steps["train"].info.run_id
    finally:
        # `mlflow` is in the manual and pipeline profiles: a plain `down` would leave it running.
        subprocess.run(
            ["docker", "compose", "--profile", "*", "down", "--volumes"], cwd=root, capture_output=True, timeout=120
        )
