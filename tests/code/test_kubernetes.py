"""kubernetes/: the backend config and job template, through MLflow's own loader and job rendering (no cluster)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from mlflow.projects import _parse_kubernetes_config
from mlflow.projects._project_spec import load_project
from mlflow.projects.kubernetes import _get_kubernetes_job_definition, _get_run_command

from agnews.config import PROJECT_ROOT, compose

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


def test_rendered_job_runs_locked_down_in_its_own_namespace(kube_config: dict) -> None:
    """Non-root, no privilege escalation, no capabilities, a read-only root filesystem with scratch volumes for the
    paths the steps write, and a namespace of its own."""
    job = render_job(kube_config)
    assert job["metadata"]["namespace"] not in ("", "default")
    pod = job["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    (container,) = pod["containers"]
    security = container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"] == {"drop": ["ALL"]}
    scratch = {v["name"] for v in pod["volumes"] if v.get("emptyDir") == {}}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    code = "/mlflow/projects/code"  # where --build-image puts the project, the steps' working folder
    for path in ("/tmp", f"{code}/.checkpoints", f"{code}/.store", "/home/app"):
        assert mounts.get(path) in scratch, path


def test_writable_paths_match_the_config_and_the_image(monkeypatch: pytest.MonkeyPatch) -> None:
    """The scratch volumes are where the config's defaults write when the project sits at /mlflow/projects/code."""
    template = yaml.safe_load((PROJECT_ROOT / "kubernetes" / "job-template.yaml").read_text())
    mounts = {m["mountPath"] for m in template["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]}
    monkeypatch.delenv("S3_BUCKET", raising=False)
    cfg = compose()
    root = str(PROJECT_ROOT)
    for written in (cfg.storage.uri, str(Path(cfg.train.output_dir).parent)):
        assert written.startswith(root)
        assert written.replace(root, "/mlflow/projects/code", 1) in mounts, written


def test_monitor_cronjob_runs_the_monitor_step_locked_down_like_the_job() -> None:
    """kubernetes/monitor-cronjob.yaml: a valid CronJob (strict schema) that runs `python -m steps.monitor` once at
    a time, without retries, with the job template's pod and container security, in the same namespace."""
    cron = yaml.safe_load((PROJECT_ROOT / "kubernetes" / "monitor-cronjob.yaml").read_text())
    kubernetes_validate.validate(cron, kubernetes_validate.latest_version(), strict=True)
    job = yaml.safe_load((PROJECT_ROOT / "kubernetes" / "job-template.yaml").read_text())
    assert cron["metadata"]["namespace"] == job["metadata"]["namespace"]
    assert cron["spec"]["concurrencyPolicy"] == "Forbid" and cron["spec"]["jobTemplate"]["spec"]["backoffLimit"] == 0
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    job_pod = job["spec"]["template"]["spec"]
    assert pod["securityContext"] == job_pod["securityContext"]
    (container,) = pod["containers"]
    (job_container,) = job_pod["containers"]
    assert container["securityContext"] == job_container["securityContext"]
    assert container["envFrom"] == job_container["envFrom"]
    assert container["command"][:3] == ["python", "-m", "steps.monitor"]
    assert importlib.util.find_spec("steps.monitor") is not None
    scratch = {v["name"] for v in pod["volumes"] if v.get("emptyDir") == {}}
    assert {m["mountPath"]: m["name"] for m in container["volumeMounts"]}.get("/tmp") in scratch
