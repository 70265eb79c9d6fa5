"""The `main` pipeline on local SQLite: nested child runs under one parent, upload skipped, a failing child."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.entities import Run

from agnews.config import PROJECT_ROOT
from agnews.errors import ConfigError
from agnews.names import CHAMPION
from agnews.pipeline import pipeline
from agnews.promotion.registry import aliases
from agnews.upload import upload
from bundle.layout import POINTER

pytestmark = pytest.mark.integration  # the pipeline, trained end to end

QUICK = ["preset=test", "train.epochs=0.3", "registry.min_accuracy=0", "registry.min_behaviour_pass_rate=0"]
STEPS = ("upload", "train", "register")


def runs_by_step(tracking_uri: str) -> dict[str, Run]:
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("agnews")
    return {run.data.tags["step"]: run for run in client.search_runs([experiment.experiment_id])}


def test_pipeline_nests_the_steps_under_one_parent_and_skips_a_current_upload(make_cfg, agnews_dir: Path) -> None:
    cfg = make_cfg(f"data.source={agnews_dir}", "registry.model_name=pipeline-model", *QUICK)
    upload(cfg.data, cfg.storage)  # the identical dataset is already in storage: the pipeline skips the upload

    outcome = pipeline(cfg)

    runs = runs_by_step(cfg.tracking.uri)
    assert sorted(runs) == sorted(["main", *STEPS])
    parent = runs["main"]
    assert parent.info.status == "FINISHED"
    for step in STEPS:
        child = runs[step]
        assert child.info.status == "FINISHED"
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert parent.data.tags[f"child.{step}"] == child.info.run_id
    assert parent.data.tags["upload"] == "skipped" and runs["upload"].data.tags["dataset.changed"] == "false"
    assert (outcome.version, outcome.alias) == (1, CHAMPION)
    assert parent.data.tags["registered_version"] == "1" and parent.data.tags["registered_alias"] == CHAMPION
    client = MlflowClient(cfg.tracking.uri)
    assert client.get_model_version("pipeline-model", "1").run_id == runs["train"].info.run_id
    assert runs["register"].data.params["registry.run_id"] == runs["train"].info.run_id
    pointer = json.loads((Path(cfg.storage.uri) / "models" / "pipeline-model" / POINTER).read_text())
    assert pointer["version"] == 1


def test_failing_child_fails_the_parent_with_its_error(tmp_path: Path, agnews_dir: Path) -> None:
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = subprocess.run(
        [
            # a sample larger than the stored train split: the train step fails on the data, after upload ran
            *(sys.executable, "-m", "steps.main", f"data.source={agnews_dir}", *QUICK, "data.sample_size=999999"),
            *(f"tracking.uri={tracking}", f"storage.uri={tmp_path / 'store'}", "registry.model_name=never"),
            f"train.output_dir={tmp_path / 'checkpoints'}",
        ],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    message = "DataError: data.sample_size=999999 is larger than the "
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {message.removeprefix('DataError: ')}")
    assert "Traceback" not in result.stderr

    runs = runs_by_step(tracking)
    assert sorted(runs) == ["main", "train", "upload"]
    parent, failed = runs["main"], runs["train"]
    assert (parent.info.status, failed.info.status, runs["upload"].info.status) == ("FAILED", "FAILED", "FINISHED")
    assert parent.data.tags["upload"] == "uploaded"
    assert parent.data.tags["failed_step"] == "train"
    assert parent.data.tags["error"] == failed.data.tags["error"]
    assert failed.data.tags["error"].startswith(message)
    assert parent.data.tags["child.train"] == failed.info.run_id
    assert aliases(MlflowClient(tracking), "never") == {}


def test_registry_options_are_refused_before_any_work(make_cfg) -> None:
    for option in ("registry.rollback=true", "registry.version=2", "registry.run_id=abc"):
        with pytest.raises(ConfigError, match="main registers the run it trains"):
            pipeline(make_cfg(option))
