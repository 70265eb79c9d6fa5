"""The model under test: ``pytest tests/model --model-uri models:/distilbert-agnews@champion`` (any MLflow model
URI), tracked where the pipeline tracks (``MLFLOW_TRACKING_URI``, else the local SQLite store). Without
``--model-uri`` these tests are skipped."""

from __future__ import annotations

import mlflow
import pytest

from agnews.config import compose


@pytest.fixture(scope="session")
def model_uri(request: pytest.FixtureRequest) -> str:
    uri = request.config.getoption("--model-uri")
    if not uri:
        pytest.skip("no --model-uri: pass the model to check, e.g. --model-uri models:/distilbert-agnews@champion")
    return uri


@pytest.fixture(scope="session")
def model(model_uri: str) -> mlflow.pyfunc.PyFuncModel:
    mlflow.set_tracking_uri(compose().tracking.uri)
    return mlflow.pyfunc.load_model(model_uri)


@pytest.fixture(scope="session")
def min_pass_rate(request: pytest.FixtureRequest) -> float:
    given = request.config.getoption("--min-pass-rate")
    return compose().registry.min_behaviour_pass_rate if given is None else given
