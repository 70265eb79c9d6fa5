"""kubernetes/: the backend config and job template, through MLflow's own loader and job rendering (no cluster)."""

from __future__ import annotations

import json

import kubernetes_validate
import pytest
from mlflow.projects import _parse_kubernetes_config
from mlflow.projects._project_spec import load_project
from mlflow.projects.kubernetes import _get_kubernetes_job_definition, _get_run_command

from agnews.config import PROJECT_ROOT

BACKEND_CONFIG = PROJECT_ROOT / "kubernetes" / "backend-config.json"
RUN_ENV = {"MLFLOW_RUN_ID": "0123abcd", "MLFLOW_EXPERIMENT_ID": "1", "MLFLOW_TRACKING_URI": "http://mlflow:5000"}


@pytest.fixture
def kube_config(monkeypatch: pytest.MonkeyPatch) -> dict:
    """The backend config as `mlflow run . --backend kubernetes` loads it, from the project root."""
    monkeypatch.chdir(PROJECT_ROOT)
    monkeypatch.delenv("KUBE_MLFLOW_TRACKING_URI", raising=False)
    return _parse_kubernetes_config(json.loads(BACKEND_CONFIG.read_text()))


def render_job(kube_config: dict) -> dict:
    """The Job that MLflow would submit for `-e main -P model=tiny`."""
    project = load_project(str(PROJECT_ROOT))
    command = project.get_entry_point("main").compute_command({"model": "tiny"}, None)
    return _get_kubernetes_job_definition(
        project.name,
        f"{kube_config['repository-uri']}:0123abc",
        "sha256:" + "0" * 64,
        _get_run_command([command]),
        dict(RUN_ENV),
        kube_config["kube-job-template"],
    )


def test_backend_config_has_what_mlflow_needs(kube_config: dict) -> None:
    assert kube_config["kube-context"]
    assert kube_config["repository-uri"].endswith("/agnews-mlops")
    assert kube_config["kube-job-template"]["kind"] == "Job"


def test_project_declares_the_docker_env_that_kubernetes_needs() -> None:
    assert load_project(str(PROJECT_ROOT)).docker_env["image"] == "agnews-mlops"


def test_rendered_job_runs_the_entry_point(kube_config: dict) -> None:
    job = render_job(kube_config)
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert job["metadata"]["name"].startswith("agnews-mlops-")
    assert container["image"] == f"{kube_config['repository-uri']}:0123abc@sha256:{'0' * 64}"
    assert container["command"][:3] == ["python", "-m", "steps.main"]
    assert "model=tiny" in container["command"]
    assert {e["name"]: e["value"] for e in container["env"]} == RUN_ENV
    assert container["envFrom"] == [{"secretRef": {"name": "agnews-mlops", "optional": True}}]
    assert job["spec"]["backoffLimit"] == 0


def test_rendered_job_is_a_valid_kubernetes_job(kube_config: dict) -> None:
    """Strict schema check (unknown or misspelt fields fail) against the newest Kubernetes API known."""
    job = render_job(kube_config)
    kubernetes_validate.validate(job, kubernetes_validate.latest_version(), strict=True)
