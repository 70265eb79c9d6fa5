"""The tracking connection: relative SQLite URIs resolve as MLflow resolves them."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest

from agnews.tracking import step_run


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
