"""The behavioural checks (agnews/behaviour.json) against the model under test, kind by kind."""

from __future__ import annotations

import mlflow
import pytest

from agnews.behaviour import KINDS, check


@pytest.fixture(scope="module")
def result(model: mlflow.pyfunc.PyFuncModel, labels: list[str]):
    return check(lambda texts: model.predict(texts)[labels].to_numpy(), labels)


@pytest.mark.parametrize("kind", KINDS)
def test_pass_rate(result, kind: str, min_pass_rate: float) -> None:
    failures = result.failures[result.failures.kind == kind]
    assert result.pass_rates[kind] >= min_pass_rate, failures.to_string(max_colwidth=90)
