"""Model Registry: register a train run's model, gate it into @champion with aliases, and roll back.

Aliases, as MLflow 3 uses them (stages are deprecated): ``@champion`` is the version served, ``@previous`` the
champion it replaced, ``@challenger`` the newest version that failed the quality gate.

The gate compares a candidate with the champion only when both were evaluated on the same test set (the same
``dataset.test.sha256``, ``dataset.test.rows`` and ``dataset.test.rows_sha256``: ``TestSet``). Every promotion
tags the version ``promoted_by`` (``gate`` or ``manual``) and records the champion on the registered model
(``recorded_champion``), so that a move made outside the pipeline (the MLflow UI) is recognised later and completed
the same way (``record_champion``).

Callers hold the model's lease (``agnews.lease``) around every change here, so concurrent calls end as if serial,
and pass a ``FencedClient``, whose every write first checks that the lease is still held.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import LoggedModel, Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.models import EvaluationResult, MetricThreshold
from mlflow.models.evaluation.validation import ModelValidationFailedException
from omegaconf import DictConfig

from agnews.config import redact
from agnews.data import rows_sha256
from agnews.errors import RegistryError
from agnews.pyfunc import LOGGED_MODEL

CHAMPION, PREVIOUS, CHALLENGER = "champion", "previous", "challenger"
PROMOTED_BY, BY_GATE, BY_HAND = "promoted_by", "gate", "manual"  # version tag: how it became @champion
RECORDED_CHAMPION = "recorded_champion"  # registered model tag: the champion as the pipeline last saw it
TEST_SET_TAGS = ("dataset.test.sha256", "dataset.test.rows")  # what the test set is; the train step tags both
TEST_ROWS_TAG = "dataset.test.rows_sha256"  # which rows of the test file were scored (TestSet)
WRITES = ("create_", "set_", "delete_", "update_", "rename_", "transition_", "copy_")  # MlflowClient's writes
MODEL_VERSIONS_TAG = "mlflow.modelVersions"  # a logged model's registered versions, as the MLflow UI reads them
TAGGED_METRICS = ("test_accuracy", "test_f1_macro")
BEHAVIOUR_METRICS = ("behaviour_pass_rate", "onnx_int8_behaviour_pass_rate")  # logged by the train step
MODEL_DESCRIPTION = (
    "AG News topic classifier (World, Sports, Business, Sci/Tech). @champion is the version served: the mirror "
    "step copies its ONNX int8 bundle to storage for the Lambda. @previous is the champion it replaced, "
    "@challenger the newest version that failed the quality gate. A version's promoted_by tag says how it became "
    "@champion (gate or manual); its gate tag keeps the gate's verdict at registration."
)

log = logging.getLogger(__name__)
# MLflow's model validation logs two INFO lines for each of the gate's checks ("Validating candidate model metrics
# against baseline", "Model validation passed!"): the gate logs its verdict instead.
logging.getLogger("mlflow.models.evaluation.validation").setLevel(logging.WARNING)


class FencedClient(MlflowClient):
    """An MlflowClient whose every registry and tracking write (a method named ``create_*``, ``set_*``,
    ``delete_*``, ...) first calls ``fence``: ``Lease.check``, which raises once the model's lease is lost, so that a
    holder paused past its lease changes nothing more."""

    def __init__(self, fence: Callable[[], None]) -> None:
        self._fence = fence
        super().__init__()

    def __getattribute__(self, name: str) -> Any:
        found = super().__getattribute__(name)
        if not name.startswith(WRITES) or not callable(found):
            return found
        fence = super().__getattribute__("_fence")

        @functools.wraps(found)
        def fenced(*args: Any, **kwargs: Any) -> Any:
            fence()
            return found(*args, **kwargs)

        return fenced


@dataclass(frozen=True)
class Verdict:
    """Where a register call left the model: ``version`` holds ``alias``, for ``reason``."""

    model_name: str
    version: int
    alias: str
    reason: str

    @property
    def promoted(self) -> bool:
        return self.alias == CHAMPION

    def tags(self) -> dict[str, str]:
        return {
            "registered_model": self.model_name,
            "registered_version": str(self.version),
            "registered_alias": self.alias,
            "registered_reason": self.reason,
        }


def get_run(client: MlflowClient, run_id: str) -> Run:
    try:
        return client.get_run(run_id)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise RegistryError(
                f"no run '{run_id}' in the tracking store at {redact(mlflow.get_tracking_uri())}"
            ) from None
        raise


def find_train_run(client: MlflowClient, experiment: str, run_id: str | None) -> Run:
    """The run ``run_id``, or the newest finished train run in ``experiment``."""
    if run_id:
        return get_run(client, run_id)
    found = client.get_experiment_by_name(experiment)
    runs = (
        client.search_runs(
            [found.experiment_id],
            filter_string="tags.step = 'train' AND attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if found
        else []
    )
    if not runs:
        raise RegistryError(f"no finished train run in experiment '{experiment}': run the train step first")
    return runs[0]


def logged_model(client: MlflowClient, run: Run) -> LoggedModel:
    """The pyfunc that the train run logged; a RegistryError for an unfinished run or one without a model."""
    run_id, step = run.info.run_id, run.data.tags.get("step", "untagged")
    if run.info.status != "FINISHED":
        raise RegistryError(f"run {run_id} ({step}) is {run.info.status}, not FINISHED: register a finished train run")
    outputs = run.outputs.model_outputs if run.outputs else []
    models = [m for m in (client.get_logged_model(o.model_id) for o in outputs) if m.name == LOGGED_MODEL]
    if not models:
        raise RegistryError(f"run {run_id} ({step} run) logged no model '{LOGGED_MODEL}': register a train run")
    if "test_accuracy" not in run.data.metrics:
        raise RegistryError(f"run {run_id} logged no test_accuracy metric: the quality gate needs it")
    return models[-1]


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


def version_tags(run: Run) -> dict[str, str]:
    """Dataset digests and test rows, git commit, test metrics and the source run, as model version tags."""
    tags = {k: v for k, v in run.data.tags.items() if k.startswith("dataset.")}
    tags |= {name: str(run.data.metrics[name]) for name in TAGGED_METRICS if name in run.data.metrics}
    return tags | {"run_id": run.info.run_id, "git_commit": run.data.tags.get("git_commit", "unknown")}


def describe(run: Run) -> str:
    metrics, tags = run.data.metrics, run.data.tags
    return (
        f"{run.data.params.get('model.display_name', 'model')} from train run {run.info.run_id} at git "
        f"{tags.get('git_commit', 'unknown')}: test accuracy {metrics['test_accuracy']:.4f}, macro-F1 "
        f"{metrics.get('test_f1_macro', float('nan')):.4f}; "
        f"train data sha256 {tags.get('dataset.train.sha256', 'unknown')}"
    )


def link_logged_model(client: MlflowClient, model: LoggedModel, version: ModelVersion) -> None:
    """List ``version`` in the logged model's ``mlflow.modelVersions`` tag, which the UI's logged-model page reads (a
    tracking server does this itself when a version names its model id; a local SQLite store does not)."""
    current = client.get_logged_model(model.model_id).tags.get(MODEL_VERSIONS_TAG)
    try:
        listed = json.loads(current) if current else []
    except ValueError:
        listed = []
    if any(
        str(entry.get("name")) == version.name and str(entry.get("version")) == str(version.version) for entry in listed
    ):
        return
    entry = {"name": version.name, "version": int(version.version)}
    client.set_logged_model_tags(model.model_id, {MODEL_VERSIONS_TAG: json.dumps([*listed, entry])})


def create_version(client: MlflowClient, name: str, run: Run) -> ModelVersion:
    """Register the run's logged model as a new version of ``name``, with tags and a description: the source is
    ``models:/m-<id>`` and the model id is given, as ``mlflow.register_model`` does for a logged model, so that the
    logged model lists the version (``link_logged_model``) and the UI links the two."""
    model = logged_model(client, run)
    try:
        client.create_registered_model(name, description=MODEL_DESCRIPTION)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(
        name,
        source=model.model_uri,
        run_id=run.info.run_id,
        tags=version_tags(run),
        description=describe(run),
        model_id=model.model_id,
    )
    link_logged_model(client, model, version)
    log.info("registered %s (run %s) as %s version %s", model.model_uri, run.info.run_id, name, version.version)
    return version


def aliases(client: MlflowClient, name: str) -> dict[str, int]:
    """The registered model's aliases and the versions they name; empty for a model not registered yet."""
    try:
        return {alias: int(v) for alias, v in client.get_registered_model(name).aliases.items()}
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return {}
        raise


def version_accuracy(client: MlflowClient, version: ModelVersion) -> float | None:
    """The test accuracy that register tagged on the version, else its run's metric; None when neither exists."""
    if "test_accuracy" in version.tags:
        return float(version.tags["test_accuracy"])
    return client.get_run(version.run_id).data.metrics.get("test_accuracy") if version.run_id else None


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
    registry: DictConfig,
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
            "test_accuracy",
            accuracy,
            registry.min_accuracy,
            f"test accuracy {accuracy:.4f}",
            f"registry.min_accuracy {registry.min_accuracy}",
        ),
        (
            "behaviour_pass_rate",
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
                "test_accuracy",
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


def recorded_champion(client: MlflowClient, name: str) -> int | None:
    """The champion as the pipeline last recorded it (the ``recorded_champion`` tag); None when never recorded."""
    value = client.get_registered_model(name).tags.get(RECORDED_CHAMPION, "")
    return int(value) if value.isdecimal() else None


def record(client: MlflowClient, name: str, version: int, by: str) -> None:
    """Tag how ``version`` became @champion and record it as the champion. Written after the alias moved, so that an
    interrupted promotion reads as a move by hand (which ``record_champion`` completes), never the other way round."""
    client.set_model_version_tag(name, str(version), PROMOTED_BY, by)
    client.set_registered_model_tag(name, RECORDED_CHAMPION, str(version))


def promote(client: MlflowClient, name: str, version: int, by: str) -> int | None:
    """Make ``version`` @champion, ``by`` the gate or by hand; the champion it replaces becomes @previous, and the
    version stops being @challenger. Returns the replaced version."""
    current = aliases(client, name)
    old = current.get(CHAMPION)
    if old == version:
        return None
    if old is not None:
        client.set_registered_model_alias(name, PREVIOUS, str(old))
    client.set_registered_model_alias(name, CHAMPION, str(version))
    if current.get(CHALLENGER) == version:
        client.delete_registered_model_alias(name, CHALLENGER)
    record(client, name, version, by)
    return old


def record_champion(client: MlflowClient, name: str, served: int | None) -> str | None:
    """Complete a move of @champion made outside the pipeline (in the MLflow UI, or through the REST API): the
    champion it replaced (the recorded one, else ``served``, the version storage serves) becomes @previous, the
    version stops being @challenger, and it is tagged ``promoted_by=manual``. None when there was no such move."""
    current = aliases(client, name)
    champion = current.get(CHAMPION)
    if champion is None:
        return None
    recorded = recorded_champion(client, name)
    if champion == recorded:
        return None
    replaced = recorded if recorded is not None else served
    note = f"@{CHAMPION} was moved to v{champion} outside the pipeline"
    if replaced is not None and replaced != champion and version_exists(client, name, replaced):
        client.set_registered_model_alias(name, PREVIOUS, str(replaced))
        note += f"; v{replaced} is now @{PREVIOUS}"
    if current.get(CHALLENGER) == champion:
        client.delete_registered_model_alias(name, CHALLENGER)
    record(client, name, champion, BY_HAND)
    log.info("%s: %s", name, note)
    return note


def version_exists(client: MlflowClient, name: str, version: int) -> bool:
    try:
        client.get_model_version(name, str(version))
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise
    return True


def register_run(client: MlflowClient, registry: DictConfig, experiment: str) -> Verdict:
    """Register a train run's model and pass it through the quality gate: @champion or @challenger."""
    name = registry.model_name
    run = find_train_run(client, experiment, registry.run_id)
    champion = aliases(client, name).get(CHAMPION)
    champion_version = client.get_model_version(name, str(champion)) if champion is not None else None
    champion_accuracy = version_accuracy(client, champion_version) if champion_version is not None else None
    champion_test_set = TestSet.of(champion_version.tags) if champion_version is not None else None
    version = int(create_version(client, name, run).version)
    test_set = TestSet.of(client.get_model_version(name, str(version)).tags)  # as tagged on the version
    passed, reason = gate(
        registry,
        run.data.metrics["test_accuracy"],
        behaviour_pass_rate(run),
        champion,
        champion_accuracy,
        test_set,
        champion_test_set,
    )
    if passed:
        promote(client, name, version, BY_GATE)
    else:
        client.set_registered_model_alias(name, CHALLENGER, str(version))
    client.set_model_version_tag(name, str(version), "gate", reason)
    return Verdict(name, version, CHAMPION if passed else CHALLENGER, reason)


def set_champion(client: MlflowClient, name: str, version: int, reason: str) -> Verdict:
    """Make an existing version @champion, whatever the gate says (a manual promotion or a rollback)."""
    try:
        client.get_model_version(name, str(version))
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise RegistryError(f"model '{name}' has no version {version}") from None
        raise
    old = promote(client, name, version, BY_HAND)
    replaced = f"; v{old} is now @{PREVIOUS}" if old is not None else ""
    return Verdict(name, version, CHAMPION, f"{reason}{replaced}")


def rollback(client: MlflowClient, name: str) -> Verdict:
    """Move @champion back to @previous; the champion it replaces becomes @previous, so a second rollback undoes it."""
    previous = aliases(client, name).get(PREVIOUS)
    if previous is None:
        raise RegistryError(
            f"model '{name}' has no @{PREVIOUS} version to roll back to; pick one with registry.version=N"
        )
    return set_champion(client, name, previous, f"rolled back to v{previous}")


def update(cfg: DictConfig, client: MlflowClient) -> Verdict:
    """What ``register`` does with the registry: roll back, promote ``registry.version``, or register a run. The
    caller has completed any move of @champion made outside the pipeline (``record_champion``), so that this call sees
    the registry as if that move had gone through the pipeline too."""
    registry = cfg.registry  # its combinations are checked by its schema (agnews/settings.py)
    if registry.rollback:
        outcome = rollback(client, registry.model_name)
    elif registry.version is not None:
        outcome = set_champion(client, registry.model_name, registry.version, "set by registry.version")
    else:
        outcome = register_run(client, registry, cfg.tracking.experiment)
    level = logging.INFO if outcome.promoted else logging.WARNING
    log.log(level, "%s v%s is @%s: %s", outcome.model_name, outcome.version, outcome.alias, outcome.reason)
    return outcome
