"""The register step's quality gate: whether a candidate may replace @champion, and the test set both were scored on.

The gate compares a candidate with the champion only when both were evaluated on the same test set (the same
``dataset.test.sha256``, ``dataset.test.rows`` and ``dataset.test.rows_sha256``: ``TestSet``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import mlflow
from mlflow.entities import Run
from mlflow.models import EvaluationResult, MetricThreshold
from mlflow.models.evaluation.validation import ModelValidationFailedException

from agnews.data import rows_sha256
from agnews.names import (
    BEHAVIOUR_PASS_RATE,
    ONNX_INT8_BEHAVIOUR_PASS_RATE,
    TEST_ACCURACY,
    TEST_ROWS_COUNT_TAG,
    TEST_ROWS_TAG,
    TEST_SHA256_TAG,
)
from agnews.settings import RegistrySettings

TEST_SET_TAGS = (TEST_SHA256_TAG, TEST_ROWS_COUNT_TAG)  # what the test set is; the train step tags both
BEHAVIOUR_METRICS = (BEHAVIOUR_PASS_RATE, ONNX_INT8_BEHAVIOUR_PASS_RATE)  # logged by the train step

# MLflow's model validation logs two INFO lines for each of the gate's checks ("Validating candidate model metrics
# against baseline", "Model validation passed!"): the gate logs its verdict instead.
logging.getLogger("mlflow.models.evaluation.validation").setLevel(logging.WARNING)


@dataclass(frozen=True, eq=False)
class TestSet:
    """The identity of the test set a model was evaluated on: the test file's sha256, the number of rows evaluated
    and which ones (``rows_sha256``, ``agnews.data.rows_sha256`` of their line numbers: with ``data.test_size`` the
    sample depends on the seed).

    A version tagged before ``rows_sha256`` existed has None there. Its rows are taken to be the whole file, which is
    what the file's sha256 and the row count named then: it is the same test set as a run that scored every row of
    that file (rows 0 to ``rows`` - 1), and not the same as any sample, whose rows it cannot be shown to share.
    """

    __test__ = False  # a name that pytest would otherwise collect where tests import it
    sha256: str
    rows: int
    rows_sha256: str | None = None

    @classmethod
    def of(cls, tags: dict[str, str]) -> TestSet | None:
        """From run or version tags; None when the file's sha256 or the row count is missing or malformed."""
        sha, rows = (tags.get(name, "") for name in TEST_SET_TAGS)
        return cls(sha, int(rows), tags.get(TEST_ROWS_TAG) or None) if sha and rows.isdecimal() else None

    def _scored(self) -> str:
        """The digest of the rows scored; for an old version without one, that of the whole file's rows."""
        return self.rows_sha256 or rows_sha256(range(self.rows))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TestSet):
            return NotImplemented
        return (self.sha256, self.rows, self._scored()) == (other.sha256, other.rows, other._scored())

    def __hash__(self) -> int:
        return hash((self.sha256, self.rows))

    def __str__(self) -> str:
        rows = f" (rows sha256 {self.rows_sha256[:12]})" if self.rows_sha256 else ""
        return f"test set sha256 {self.sha256[:12]}, {self.rows} rows{rows}"


def behaviour_pass_rate(run: Run) -> float:
    """The lower of the behavioural pass rates of the run's pyfunc and of its int8 bundle; 0 when not logged."""
    return min(run.data.metrics.get(name, 0.0) for name in BEHAVIOUR_METRICS)


def meets(metric: str, value: float, floor: float) -> bool:
    """Whether ``value`` of ``metric`` is at least ``floor``, as MLflow's model validation judges it
    (``mlflow.validate_evaluation_results`` with a ``MetricThreshold``)."""
    threshold = MetricThreshold(threshold=floor, greater_is_better=True)
    try:
        mlflow.validate_evaluation_results({metric: threshold}, EvaluationResult({metric: value}, {}))
    except ModelValidationFailedException:
        return False
    return True


def gate(
    registry: RegistrySettings,
    accuracy: float,
    behaviour: float,
    champion: int | None,
    champion_accuracy: float | None,
    test_set: TestSet | None = None,
    champion_test_set: TestSet | None = None,
) -> tuple[bool, str]:
    """Whether the candidate passes the quality gate, and why: test accuracy at least ``min_accuracy`` and a
    behavioural pass rate at least ``min_behaviour_pass_rate``; with a champion, the same test set as the champion's
    (``test_set``: a candidate or champion without one is not comparable) and test accuracy at least the champion's
    minus ``tolerance``. A candidate with no test set identity is rejected with or without a champion.

    MLflow's model validation judges each number (``meets``); the test set's identity, which it lacks, comes first.
    Its change thresholds ask for an improvement on the baseline, and the tolerance allows a drop, so the champion's
    accuracy minus the tolerance is a floor like the others."""
    checks = [  # (metric, value, floor, what, bound)
        (
            TEST_ACCURACY,
            accuracy,
            registry.min_accuracy,
            f"test accuracy {accuracy:.4f}",
            f"registry.min_accuracy {registry.min_accuracy}",
        ),
        (
            BEHAVIOUR_PASS_RATE,
            behaviour,
            registry.min_behaviour_pass_rate,
            f"behavioural pass rate {behaviour:.4f}",
            f"registry.min_behaviour_pass_rate {registry.min_behaviour_pass_rate}",
        ),
    ]
    comparable = []
    if test_set is None:
        comparable.append(f"the candidate has no test set identity (tags {' and '.join(TEST_SET_TAGS)})")
    elif champion is not None and champion_test_set is None:
        comparable.append(f"champion v{champion} has no test set identity (tags {' and '.join(TEST_SET_TAGS)})")
    elif champion is not None and champion_test_set != test_set:
        comparable.append(f"it was evaluated on {test_set}, champion v{champion} on {champion_test_set}")
    if champion is not None and champion_accuracy is not None and not comparable:
        checks.append(
            (
                TEST_ACCURACY,
                accuracy,
                champion_accuracy - registry.tolerance,
                f"test accuracy {accuracy:.4f}",
                f"champion v{champion}'s {champion_accuracy:.4f} minus registry.tolerance {registry.tolerance}",
            )
        )
    judged = [(meets(metric, value, floor), what, bound) for metric, value, floor, what, bound in checks]
    failed = [f"not comparable: {why}" for why in comparable]
    failed += [f"{what} is below {bound}" for ok, what, bound in judged if not ok]
    if failed:
        return False, f"rejected by the {registry.gate} gate: {'; '.join(failed)}"
    passed = "; ".join(f"{what} is at least {bound}" for _, what, bound in judged)
    same = f"; the same {test_set} as champion v{champion}" if champion is not None else ""
    return True, f"promoted by the {registry.gate} gate: {passed}{same}"
