"""Model Registry: register a train run's model, gate it into @champion with aliases, and roll back.

Aliases, as MLflow 3 uses them (stages are deprecated): ``@champion`` is the version served, ``@previous`` the
champion it replaced, ``@challenger`` the newest version that failed the quality gate.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import mlflow
from mlflow import MlflowClient
from mlflow.entities import LoggedModel, Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig

from agnews.errors import ConfigError, RegistryError
from agnews.pyfunc import LOGGED_MODEL

CHAMPION, PREVIOUS, CHALLENGER = "champion", "previous", "challenger"
TAGGED_METRICS = ("test_accuracy", "test_f1_macro")
BEHAVIOUR_METRICS = ("behaviour_pass_rate", "onnx_int8_behaviour_pass_rate")  # logged by the train step
MODEL_DESCRIPTION = (
    "AG News topic classifier (World, Sports, Business, Sci/Tech). @champion is the version served: the mirror "
    "step copies its ONNX int8 bundle to storage for the Lambda. @previous is the champion it replaced, "
    "@challenger the newest version that failed the quality gate."
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
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
            raise RegistryError(f"no run '{run_id}' in the tracking store at {mlflow.get_tracking_uri()}") from None
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


def version_tags(run: Run) -> dict[str, str]:
    """Dataset digests and test rows, git commit, test metrics and the source run, as model version tags."""
    tags = {k: v for k, v in run.data.tags.items() if k.startswith("dataset.")}
    tags |= {name: str(run.data.metrics[name]) for name in TAGGED_METRICS if name in run.data.metrics}
    return tags | {"run_id": run.info.run_id, "git_commit": run.data.tags.get("git_commit", "unknown")}


def describe(run: Run) -> str:
    metrics, tags = run.data.metrics, run.data.tags
    return (
        f"{run.data.params.get('model.name', 'model')} from train run {run.info.run_id} at git "
        f"{tags.get('git_commit', 'unknown')}: test accuracy {metrics['test_accuracy']:.4f}, macro-F1 "
        f"{metrics.get('test_f1_macro', float('nan')):.4f}; "
        f"train data sha256 {tags.get('dataset.train.sha256', 'unknown')}"
    )


def create_version(client: MlflowClient, name: str, run: Run) -> ModelVersion:
    """Register the run's model (``runs:/<id>/model``) as a new version of ``name``, with tags and a description."""
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
    log.info("registered runs:/%s/%s as %s version %s", run.info.run_id, LOGGED_MODEL, name, version.version)
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


def gate(
    registry: DictConfig,
    accuracy: float,
    behaviour: float,
    champion: int | None,
    champion_accuracy: float | None,
) -> tuple[bool, str]:
    """Whether the candidate passes the quality gate, and why: test accuracy at least ``min_accuracy`` and at least
    the champion's minus ``tolerance``, and a behavioural pass rate at least ``min_behaviour_pass_rate``."""
    checks = [
        (
            accuracy >= registry.min_accuracy,
            f"test accuracy {accuracy:.4f}",
            f"registry.min_accuracy {registry.min_accuracy}",
        ),
        (
            behaviour >= registry.min_behaviour_pass_rate,
            f"behavioural pass rate {behaviour:.4f}",
            f"registry.min_behaviour_pass_rate {registry.min_behaviour_pass_rate}",
        ),
    ]
    if champion_accuracy is not None:
        checks.append(
            (
                accuracy >= champion_accuracy - registry.tolerance,
                f"test accuracy {accuracy:.4f}",
                f"champion v{champion}'s {champion_accuracy:.4f} minus registry.tolerance {registry.tolerance}",
            )
        )
    failed = [f"{what} is below {bound}" for ok, what, bound in checks if not ok]
    if failed:
        return False, f"rejected by the {registry.gate} gate: {'; '.join(failed)}"
    passed = "; ".join(f"{what} is at least {bound}" for _, what, bound in checks)
    return True, f"promoted by the {registry.gate} gate: {passed}"


def promote(client: MlflowClient, name: str, version: int) -> int | None:
    """Make ``version`` @champion; the champion it replaces becomes @previous. Returns that replaced version."""
    current = aliases(client, name)
    old = current.get(CHAMPION)
    if old == version:
        return None
    if old is not None:
        client.set_registered_model_alias(name, PREVIOUS, old)
    client.set_registered_model_alias(name, CHAMPION, version)
    if current.get(CHALLENGER) == version:
        client.delete_registered_model_alias(name, CHALLENGER)
    return old


def register_run(client: MlflowClient, registry: DictConfig, experiment: str) -> Outcome:
    """Register a train run's model and pass it through the quality gate: @champion or @challenger."""
    name = registry.model_name
    run = find_train_run(client, experiment, registry.run_id)
    champion = aliases(client, name).get(CHAMPION)
    champion_accuracy = (
        version_accuracy(client, client.get_model_version(name, champion)) if champion is not None else None
    )
    version = int(create_version(client, name, run).version)
    passed, reason = gate(
        registry, run.data.metrics["test_accuracy"], behaviour_pass_rate(run), champion, champion_accuracy
    )
    if passed:
        promote(client, name, version)
    else:
        client.set_registered_model_alias(name, CHALLENGER, version)
    client.set_model_version_tag(name, version, "gate", reason)
    return Outcome(name, version, CHAMPION if passed else CHALLENGER, reason)


def set_champion(client: MlflowClient, name: str, version: int, reason: str) -> Outcome:
    """Make an existing version @champion, whatever the gate says (a manual promotion or a rollback)."""
    try:
        client.get_model_version(name, version)
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            raise RegistryError(f"model '{name}' has no version {version}") from None
        raise
    old = promote(client, name, version)
    replaced = f"; v{old} is now @{PREVIOUS}" if old is not None else ""
    return Outcome(name, version, CHAMPION, f"{reason}{replaced}")


def rollback(client: MlflowClient, name: str) -> Outcome:
    """Move @champion back to @previous; the champion it replaces becomes @previous, so a second rollback undoes it."""
    previous = aliases(client, name).get(PREVIOUS)
    if previous is None:
        raise RegistryError(
            f"model '{name}' has no @{PREVIOUS} version to roll back to; pick one with registry.version=N"
        )
    return set_champion(client, name, previous, f"rolled back to v{previous}")


def update(cfg: DictConfig) -> Outcome:
    """What ``register`` does with the registry: roll back, promote ``registry.version``, or register a run."""
    registry = cfg.registry
    if registry.rollback and registry.version is not None:
        raise ConfigError("registry.rollback=true and registry.version are exclusive: set one")
    if (registry.rollback or registry.version is not None) and registry.run_id:
        raise ConfigError("registry.run_id registers a new version: do not combine it with a rollback or version")
    client = MlflowClient()
    if registry.rollback:
        outcome = rollback(client, registry.model_name)
    elif registry.version is not None:
        if not str(registry.version).isdecimal():
            raise ConfigError(f"registry.version={registry.version} is not a version number")
        outcome = set_champion(client, registry.model_name, int(registry.version), "set by registry.version")
    else:
        outcome = register_run(client, registry, cfg.tracking.experiment)
    level = logging.INFO if outcome.promoted else logging.WARNING
    log.log(level, "%s v%s is @%s: %s", outcome.model_name, outcome.version, outcome.alias, outcome.reason)
    return outcome
