"""The register step's Model Registry work: register a train run's model, gate it into @champion with aliases, and
roll back.

Aliases, as MLflow 3 uses them (stages are deprecated): ``@champion`` is the version served, ``@previous`` the
champion it replaced, ``@challenger`` the newest version that failed the quality gate (``gate``).

Every promotion tags the version ``promoted_by`` (``gate`` or ``manual``) and records the champion on the registered
model (``recorded_champion``), so that a move made outside the pipeline (the MLflow UI) is recognised later and
completed the same way (``record_champion``).

Callers hold the model's lease (``agnews.lease``) around every change here, so concurrent calls end as if serial,
and pass a ``FencedClient``, whose every write first checks that the lease is still held.
"""

from __future__ import annotations

import functools
import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import LoggedModel, Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from agnews.config import redact
from agnews.errors import RegistryError, RolloutError
from agnews.names import (
    BY_GATE,
    BY_HAND,
    CANDIDATE,
    CHALLENGER,
    CHAMPION,
    DATASET_TAG_PREFIX,
    DISPLAY_NAME_PARAM,
    GATE_TAG,
    GIT_COMMIT_TAG,
    MODEL_VERSIONS_TAG,
    PREVIOUS,
    PROMOTED_BY,
    RECORDED_CHAMPION,
    REGISTERED_ALIAS,
    REGISTERED_MODEL,
    REGISTERED_REASON,
    REGISTERED_VERSION,
    ROLLOUT_ID_TAG,
    ROLLOUT_MODE_TAG,
    ROLLOUT_WEIGHT_TAG,
    SOURCE_RUN_TAG,
    STEP_TAG,
    TEST_ACCURACY,
    TEST_F1_MACRO,
    TRAIN_SHA256_TAG,
)
from agnews.promotion.gate import TestSet, behaviour_pass_rate, gate
from agnews.pyfunc import LOGGED_MODEL
from agnews.settings import RegistrySettings

WRITES = ("create_", "set_", "delete_", "update_", "rename_", "transition_", "copy_")  # MlflowClient's writes
TAGGED_METRICS = (TEST_ACCURACY, TEST_F1_MACRO)
MODEL_DESCRIPTION = (
    "AG News topic classifier (World, Sports, Business, Sci/Tech). @champion is the version served: the mirror "
    "step copies its ONNX int8 bundle to storage for the Lambda. @previous is the champion it replaced, "
    "@challenger the newest version that failed the quality gate. A version's promoted_by tag says how it became "
    "@champion (gate or manual); its gate tag keeps the gate's verdict at registration."
)

log = logging.getLogger(__name__)


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

    @property
    def staged(self) -> bool:
        """Whether the version became @candidate (``registry.rollout``) rather than @champion."""
        return self.alias == CANDIDATE

    def tags(self) -> dict[str, str]:
        return {
            REGISTERED_MODEL: self.model_name,
            REGISTERED_VERSION: str(self.version),
            REGISTERED_ALIAS: self.alias,
            REGISTERED_REASON: self.reason,
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
            filter_string=f"tags.{STEP_TAG} = 'train' AND attributes.status = 'FINISHED'",
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
    run_id, step = run.info.run_id, run.data.tags.get(STEP_TAG, "untagged")
    if run.info.status != "FINISHED":
        raise RegistryError(f"run {run_id} ({step}) is {run.info.status}, not FINISHED: register a finished train run")
    outputs = run.outputs.model_outputs if run.outputs else []
    models = [m for m in (client.get_logged_model(o.model_id) for o in outputs) if m.name == LOGGED_MODEL]
    if not models:
        raise RegistryError(f"run {run_id} ({step} run) logged no model '{LOGGED_MODEL}': register a train run")
    if TEST_ACCURACY not in run.data.metrics:
        raise RegistryError(f"run {run_id} logged no {TEST_ACCURACY} metric: the quality gate needs it")
    return models[-1]


def version_tags(run: Run) -> dict[str, str]:
    """Dataset digests and test rows, git commit, test metrics and the source run, as model version tags."""
    tags = {k: v for k, v in run.data.tags.items() if k.startswith(DATASET_TAG_PREFIX)}
    tags |= {name: str(run.data.metrics[name]) for name in TAGGED_METRICS if name in run.data.metrics}
    return tags | {SOURCE_RUN_TAG: run.info.run_id, GIT_COMMIT_TAG: run.data.tags.get(GIT_COMMIT_TAG, "unknown")}


def describe(run: Run) -> str:
    metrics, tags = run.data.metrics, run.data.tags
    return (
        f"{run.data.params.get(DISPLAY_NAME_PARAM, 'model')} from train run {run.info.run_id} at git "
        f"{tags.get(GIT_COMMIT_TAG, 'unknown')}: test accuracy {metrics[TEST_ACCURACY]:.4f}, macro-F1 "
        f"{metrics.get(TEST_F1_MACRO, float('nan')):.4f}; "
        f"train data sha256 {tags.get(TRAIN_SHA256_TAG, 'unknown')}"
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
    if TEST_ACCURACY in version.tags:
        return float(version.tags[TEST_ACCURACY])
    return client.get_run(version.run_id).data.metrics.get(TEST_ACCURACY) if version.run_id else None


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


def no_rollout(client: MlflowClient, name: str) -> None:
    """A RolloutError when a rollout is under way: two can't be."""
    current = aliases(client, name).get(CANDIDATE)
    if current is not None:
        raise RolloutError(
            f"a rollout of {name} v{current} is under way: promote or abort it first "
            "(python -m steps.rollout promote|abort)"
        )


def make_candidate(client: MlflowClient, name: str, version: int, mode: str, weight: float) -> str:
    """Make ``version`` @candidate in ``mode`` (shadow, or a canary answering ``weight`` of the texts), its tags
    first, so that an interrupted start reads as a complete one (``mirror.registry_candidate``); the rollout's id.
    The caller checked ``no_rollout``."""
    champion = aliases(client, name).get(CHAMPION)
    if champion is None:
        raise RolloutError(f"model '{name}' has no @{CHAMPION}: a candidate meets traffic beside one")
    if version == champion:
        raise RolloutError(f"{name} v{version} is @{CHAMPION} already")
    if not version_exists(client, name, version):
        raise RolloutError(f"model '{name}' has no version {version}")
    rollout = uuid.uuid4().hex[:12]
    tags = {ROLLOUT_MODE_TAG: mode, ROLLOUT_WEIGHT_TAG: str(weight if mode == "canary" else 0), ROLLOUT_ID_TAG: rollout}
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, value)
    client.set_registered_model_alias(name, CANDIDATE, str(version))
    return rollout


def register_run(client: MlflowClient, registry: RegistrySettings, experiment: str, run_id: str | None) -> Verdict:
    """Register a train run's model (``run_id``, else the newest finished train run in ``experiment``) and pass it
    through the quality gate: @champion (or @candidate, with ``registry.rollout``) or @challenger."""
    name = registry.model_name
    if registry.rollout:
        no_rollout(client, name)
    run = find_train_run(client, experiment, run_id)
    champion = aliases(client, name).get(CHAMPION)
    champion_version = client.get_model_version(name, str(champion)) if champion is not None else None
    champion_accuracy = version_accuracy(client, champion_version) if champion_version is not None else None
    champion_test_set = TestSet.of(champion_version.tags) if champion_version is not None else None
    version = int(create_version(client, name, run).version)
    test_set = TestSet.of(client.get_model_version(name, str(version)).tags)  # as tagged on the version
    passed, reason = gate(
        registry,
        run.data.metrics[TEST_ACCURACY],
        behaviour_pass_rate(run),
        champion,
        champion_accuracy,
        test_set,
        champion_test_set,
    )
    alias = CHAMPION if passed else CHALLENGER
    if passed and registry.rollout and champion is not None:  # a first version has no champion to meet traffic beside
        make_candidate(client, name, version, registry.rollout, registry.rollout_weight)
        alias, reason = CANDIDATE, f"{reason}; it meets live traffic as a {registry.rollout} first"
    elif passed:
        promote(client, name, version, BY_GATE)
    else:
        client.set_registered_model_alias(name, CHALLENGER, str(version))
    client.set_model_version_tag(name, str(version), GATE_TAG, reason)
    return Verdict(name, version, alias, reason)


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


def update(client: MlflowClient, registry: RegistrySettings, experiment: str, run_id: str | None) -> Verdict:
    """What ``register`` does with the registry: roll back, promote ``registry.version``, or register a run
    (``register_run``). The caller has completed any move of @champion made outside the pipeline
    (``record_champion``), so that this call sees the registry as if that move had gone through the pipeline too."""
    if registry.rollback:  # its combinations are checked by its schema (agnews/settings.py)
        outcome = rollback(client, registry.model_name)
    elif registry.version is not None:
        outcome = set_champion(client, registry.model_name, registry.version, "set by registry.version")
    else:
        outcome = register_run(client, registry, experiment, run_id)
    level = logging.INFO if outcome.promoted else logging.WARNING
    log.log(level, "%s v%s is @%s: %s", outcome.model_name, outcome.version, outcome.alias, outcome.reason)
    return outcome
