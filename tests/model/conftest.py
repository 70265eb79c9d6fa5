"""The model under test: ``pytest tests/model --model-uri models:/distilbert-agnews@champion`` (any MLflow model
URI), tracked where the pipeline tracks (``MLFLOW_TRACKING_URI``, else the local SQLite store), judged by the config
that ``--overrides`` composes; ``--champion`` checks that config's registered model's ``@champion`` (``make
test-model``: the smoke run's, with ``preset=smoke``). Without either these tests are skipped."""

from __future__ import annotations

import shlex

import mlflow
import pytest

from agnews.config import compose
from agnews.settings import Settings


@pytest.fixture(scope="session")
def cfg(request: pytest.FixtureRequest) -> Settings:
    return compose(shlex.split(request.config.getoption("--overrides")))


@pytest.fixture(scope="session")
def model_uri(request: pytest.FixtureRequest, cfg: Settings) -> str:
    if request.config.getoption("--champion"):
        return f"models:/{cfg.registry.model_name}@champion"
    uri = request.config.getoption("--model-uri")
    if not uri:
        pytest.skip("no --model-uri: pass the model to check, e.g. --model-uri models:/distilbert-agnews@champion")
    return uri


@pytest.fixture(scope="session")
def model(model_uri: str, cfg: Settings) -> mlflow.pyfunc.PyFuncModel:
    mlflow.set_tracking_uri(cfg.tracking.uri)
    return mlflow.pyfunc.load_model(model_uri)


@pytest.fixture(scope="session")
def labels(cfg: Settings) -> list[str]:
    """The class names, in the model's output order (conf/data)."""
    return list(cfg.data.labels)


@pytest.fixture(scope="session")
def min_pass_rate(request: pytest.FixtureRequest, cfg: Settings) -> float:
    given = request.config.getoption("--min-pass-rate")
    return cfg.registry.min_behaviour_pass_rate if given is None else given
