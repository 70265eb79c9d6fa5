"""Hyperparameter search: an Optuna study over a model's recipe, shared by any number of worker processes.

The study lives in an RDB (``tune.storage``): each worker joins it by name and takes the next trial. The process
that creates the study opens its MLflow run, the parent; every trial, whichever worker runs it, is a child run of
that parent. A trial fine-tunes with validation choosing the epoch (``training.fine_tune``) and never reads the test
split. After the study, the best trial's parameters are written as a recipe (``recipe=<study>``), re-trained by the
train step's own code and registered behind the gate, as the main pipeline does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import mlflow
import optuna
import sqlalchemy
from mlflow import MlflowClient
from mlflow.entities import Run
from omegaconf import OmegaConf
from optuna.trial import FrozenTrial, Trial, TrialState
from optuna.visualization import matplotlib as plots
from transformers import TrainerCallback

from agnews import names
from agnews.config import redact
from agnews.data import StoredDataset
from agnews.database import database_url, reason
from agnews.errors import ConfigError, TuneError
from agnews.pipeline import train_and_register
from agnews.promotion.registry import Verdict
from agnews.settings import DataSettings, ModelSettings, Settings, TrackingSettings, TrainSettings, TuneSettings
from agnews.storage import open_storage
from agnews.tracking import connect, process_tags, step_run
from agnews.training import fine_tune

log = logging.getLogger(__name__)

# Optuna marks the heartbeat, fail_stale_trials and its matplotlib plots experimental: each use would warn.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

# Workers that start together race to create the study's tables: the losers try again, and find them made.
SCHEMA_ATTEMPTS = 5


def storage_url(tune: TuneSettings, tracking: TrackingSettings) -> str:
    """``tune.storage``, or, when null, ``optuna.db`` beside the SQLite tracking store."""
    if tune.storage:
        return str(tune.storage)
    store = urlparse(str(tracking.uri))
    if store.scheme != "sqlite":
        raise ConfigError(
            f"tune.storage=null puts the study beside a SQLite tracking store, but tracking.uri is "
            f"{redact(str(tracking.uri))}: set tune.storage to an RDB URL that every worker reaches"
        )
    folder = Path(store.path[1:]).resolve().parent
    folder.mkdir(parents=True, exist_ok=True)  # as connect() makes it for the tracking store
    return f"sqlite:///{folder / 'optuna.db'}"


def mark_lost(study: optuna.Study, trial: FrozenTrial) -> None:
    """Optuna's callback for a trial that lost its heartbeat (its worker was killed): fail its MLflow run too."""
    if run_id := trial.user_attrs.get(names.TRIAL_RUN_ATTR):
        client = MlflowClient()
        client.set_tag(run_id, names.TRIAL_STATE_TAG, TrialState.FAIL.name)
        client.set_tag(run_id, names.ERROR_TAG, "its worker stopped sending heartbeats (killed or lost)")
        client.set_terminated(run_id, "FAILED")
    log.warning("trial %d of study '%s' lost its worker: marked failed", trial.number, study.study_name)


def study_storage(tune: TuneSettings, tracking: TrackingSettings) -> optuna.storages.RDBStorage:
    """The study's RDB storage, with heartbeats: a trial whose worker dies is failed (not re-queued) by the next
    worker that asks for a trial, which also fails its MLflow run (``mark_lost``)."""
    url = storage_url(tune, tracking)
    database_url(f"{tune.prefix}.storage", url)  # a malformed URL fails here, in one line

    def connect_storage() -> optuna.storages.RDBStorage:
        return optuna.storages.RDBStorage(
            url,
            engine_kwargs={"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {},
            heartbeat_interval=tune.heartbeat_s,
            heartbeat_stale_trial_callback=mark_lost,
        )

    try:
        for _ in range(SCHEMA_ATTEMPTS - 1):
            with contextlib.suppress(sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
                return connect_storage()
            time.sleep(1)
        return connect_storage()
    except (sqlalchemy.exc.SQLAlchemyError, ImportError) as exc:  # unreachable, refused, or no driver installed
        raise TuneError(f"tune.storage={redact(url)} cannot be opened: {reason(exc)}") from None


def open_study(tune: TuneSettings, storage: optuna.storages.RDBStorage, seed: int) -> tuple[optuna.Study, bool]:
    """Create ``tune.study`` in ``storage`` or join it; True when this process created it (creation is atomic in the
    RDB).

    The creator seeds TPE with ``seed``; a joining worker draws its own seed, or it would propose the same points.
    """
    name = str(tune.study)

    def sampler(seed: int | None) -> optuna.samplers.TPESampler:
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=tune.startup_trials)

    pruner = optuna.pruners.MedianPruner(**dataclasses.asdict(tune.pruner))
    try:
        study = optuna.create_study(
            storage=storage, study_name=name, direction="maximize", sampler=sampler(seed), pruner=pruner
        )
        return study, True
    except optuna.exceptions.DuplicatedStudyError:
        return optuna.load_study(study_name=name, storage=storage, sampler=sampler(None), pruner=pruner), False


def parent_of(study: optuna.Study, timeout_s: float) -> str:
    """The parent run id that the study's creator records, waiting up to ``timeout_s`` for it."""
    deadline = time.monotonic() + timeout_s
    while (parent := study.user_attrs.get(names.STUDY_PARENT_ATTR)) is None:
        if time.monotonic() > deadline:
            raise TuneError(
                f"study '{study.study_name}' has no MLflow run after {timeout_s:.0f}s: the process that created it "
                "failed before opening one; delete the study or choose another tune.study"
            )
        time.sleep(1)
    return parent


def recipe(tune: TuneSettings, params: dict[str, Any]) -> dict[str, Any]:
    """The ``train`` settings of a trial: its parameters, with the study's early stopping."""
    return {"train": {**params, "early_stopping_patience": tune.early_stopping_patience}}


def with_recipe(train: TrainSettings, tune: TuneSettings, params: dict[str, Any], **overrides: Any) -> TrainSettings:
    """``train`` with a trial's parameters (``recipe``) and ``overrides``; the schema checks their ranges again
    (agnews/settings.py)."""
    return dataclasses.replace(train, **recipe(tune, params)["train"], **overrides)


class PruneOnValidation(TrainerCallback):
    """Reports each epoch's validation accuracy to the trial, and stops a trial that the pruner rejects."""

    def __init__(self, trial: Trial) -> None:
        self.trial = trial

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.trial.report(metrics["eval_accuracy"], step=round(state.epoch))
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"validation accuracy {metrics['eval_accuracy']:.4f} at epoch {state.epoch:.0f}")


def suggest(trial: Trial, space: dict[str, Any]) -> dict[str, Any]:
    """One point of the search space: each key a ``train`` setting, with Optuna's ``suggest_<type>`` arguments."""
    params = {}
    for name, spec in space.items():
        arguments = {key: value for key, value in spec.items() if key != "type"}
        params[name] = getattr(trial, f"suggest_{spec['type']}")(name, **arguments)
    return params


def run_trial(cfg: Settings, trial: Trial, parent: Run) -> float:
    """Fine-tune one point of the search space in a child run of ``parent``; returns the best validation accuracy.

    The run ends FINISHED for a complete or pruned trial and FAILED for a crash, with ``trial.state`` as its tag.
    """
    tags = {
        names.STEP_TAG: "tune-trial",
        names.TRIAL_NUMBER_TAG: str(trial.number),
        names.STUDY_TAG: trial.study.study_name,
    }
    tags |= process_tags()  # `python -m steps.cleanup` closes the run if this worker dies
    pruned = None
    with mlflow.start_run(
        run_name=f"trial-{trial.number}",
        experiment_id=parent.info.experiment_id,
        parent_run_id=parent.info.run_id,
        nested=True,
        tags=tags,
    ) as run:
        trial.set_user_attr(names.TRIAL_RUN_ATTR, run.info.run_id)
        try:
            params = suggest(trial, cfg.model.search)
            mlflow.log_params({f"train.{name}": value for name, value in params.items()})
            with tempfile.TemporaryDirectory(prefix="trial-") as tmp:
                # the point's values against the schema's ranges, before anything loads
                train = with_recipe(cfg.train, cfg.tune, params, output_dir=tmp, resume=False)
                dataset = StoredDataset.open(open_storage(cfg.storage), cfg.storage.dataset_prefix)
                value = fine_tune(train, cfg.data, cfg.model, cfg.seed, dataset, [PruneOnValidation(trial)]).kept()[1]
            mlflow.log_metric(names.BEST_VAL_ACCURACY, value)
            mlflow.set_tag(names.TRIAL_STATE_TAG, TrialState.COMPLETE.name)
        except optuna.TrialPruned as exc:
            mlflow.set_tag(names.TRIAL_STATE_TAG, TrialState.PRUNED.name)
            pruned = exc
        except Exception as exc:
            mlflow.set_tags(
                {names.TRIAL_STATE_TAG: TrialState.FAIL.name, names.ERROR_TAG: f"{type(exc).__name__}: {exc}"}
            )
            log.error("trial %d failed: %s: %s", trial.number, type(exc).__name__, exc)
            raise
    if pruned:
        raise pruned
    return value


def search(tune: TuneSettings, study: optuna.Study, objective: Callable[[Trial], float]) -> None:
    """Run trials of ``objective`` (``run_trial``) until the study's budget (``tune.trials``, over every worker) or
    this worker's ``tune.timeout_s`` is spent. A trial that crashes is recorded failed and the study goes on."""
    budget = tune.trials
    if len(study.trials) >= budget:
        log.info("study '%s' has its %d trials already: running none", study.study_name, budget)
        return
    study.optimize(
        objective,
        n_trials=budget,
        timeout=tune.timeout_s,
        catch=(Exception,),
        callbacks=[optuna.study.MaxTrialsCallback(budget, states=None)],
    )


def wait_for_workers(study: optuna.Study, poll_s: float) -> None:
    """Wait until no trial is running; a trial whose worker died is failed on the way (heartbeat)."""
    while running := study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        log.info("waiting for %d trials of other workers: %s", len(running), [t.number for t in running])
        time.sleep(poll_s)
        optuna.storages.fail_stale_trials(study)


def recipe_text(tune: TuneSettings, data: DataSettings, model: ModelSettings, seed: int, study: optuna.Study) -> str:
    """The best trial's settings as a config file that ``recipe=<study>`` applies over the model's own recipe."""
    best = study.best_trial
    return (
        "# @package _global_\n"
        f"# Study '{study.study_name}': trial {best.number} of {len(study.trials)}, validation accuracy "
        f"{best.value:.4f}, on model {model.display_name} with data.sample_size={data.sample_size}, "
        f"data.val_size={data.val_size}, seed={seed}.\n"
        f"# python -m steps.train model=<the same model> recipe={study.study_name}\n"
        + OmegaConf.to_yaml(recipe(tune, best.params))
    )


def log_study(study: optuna.Study) -> None:
    """The study into the active (parent) run: best trial, counts by state, and its plots."""
    best = study.best_trial
    mlflow.set_tag(names.BEST_TRIAL_TAG, str(best.number))
    mlflow.log_metric(names.BEST_VAL_ACCURACY, study.best_value)
    mlflow.log_metrics({f"trials_{s.name.lower()}": len(study.get_trials(states=(s,))) for s in TrialState})
    mlflow.log_dict(best.params, names.BEST_PARAMS_ARTIFACT)
    figures: dict[str, Callable[[optuna.Study], Any]] = {"optimization_history": plots.plot_optimization_history}
    if len(study.get_trials(states=(TrialState.COMPLETE,))) > 1:  # both need two points to compare
        figures |= {
            "param_importances": plots.plot_param_importances,
            "parallel_coordinate": plots.plot_parallel_coordinate,
        }
    for name, plot in figures.items():
        mlflow.log_figure(plot(study).figure, f"plots/{name}.png")


def finish(cfg: Settings, study: optuna.Study, parent: Run) -> Verdict:
    """Wait for the other workers, record the study, write its recipe, re-train the winner and register it."""
    wait_for_workers(study, cfg.tune.heartbeat_s)
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        raise TuneError(
            f"study '{study.study_name}' has no complete trial ({len(study.trials)} failed or pruned): "
            "see the trial runs' error tags"
        )
    log_study(study)
    text, name = recipe_text(cfg.tune, cfg.data, cfg.model, cfg.seed, study), f"{study.study_name}.yaml"
    mlflow.log_text(text, name)
    path = recipe_path(cfg.tune)
    where = str(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w" if cfg.tune.overwrite else "x") as out:  # "x": never over a recipe written meanwhile
            out.write(text)
    except OSError as exc:  # a read-only tree (the image under `mlflow run`), or a recipe there: the artifact is it
        log.warning("could not write the recipe to %s (%s): it is the run's artifact %s", path, exc.strerror, name)
        where = f"the run's artifact {name}"
    log.info("best trial %d (validation accuracy %.4f): recipe %s", study.best_trial.number, study.best_value, where)
    winner = dataclasses.replace(cfg, train=with_recipe(cfg.train, cfg.tune, study.best_params))
    return train_and_register(winner, parent)


def adopt_worker_run(parent_id: str) -> None:
    """Under ``mlflow run``, MLflow has made a run for this joining worker: tag it as a worker of the parent, so
    that the trials nest under the study's one parent, not under it."""
    if run_id := os.environ.pop("MLFLOW_RUN_ID", None):
        client = MlflowClient()
        client.set_tag(run_id, names.STEP_TAG, "tune-worker")
        client.set_tag(run_id, names.STUDY_PARENT_TAG, parent_id)


def recipe_path(tune: TuneSettings) -> Path:
    """Where the study's recipe goes: ``<tune.recipe_dir>/<tune.study>.yaml``."""
    return Path(tune.recipe_dir) / f"{tune.study}.yaml"


def check_recipe_free(tune: TuneSettings) -> None:
    """Refuse, before anything runs, a study that would write over an existing recipe (unless ``tune.overwrite``)."""
    path = recipe_path(tune)
    if tune.retrain and not tune.overwrite and path.exists():
        raise ConfigError(
            f"tune.study={tune.study}: the recipe {path} exists: choose another tune.study, or set "
            "tune.overwrite=true to replace it"
        )


def tune(cfg: Settings) -> Verdict | None:
    """Create or join the study, run trials, and (``tune.retrain``) re-train and register its winner."""
    check_recipe_free(cfg.tune)
    storage = study_storage(cfg.tune, cfg.tracking)  # first: a storage that fails says so in its one line, alone
    connect(cfg.tracking)
    study, created = open_study(cfg.tune, storage, cfg.seed)
    if created:
        with step_run(cfg, "tune") as parent:
            study.set_user_attr(names.STUDY_PARENT_ATTR, parent.info.run_id)
            shown = redact(storage_url(cfg.tune, cfg.tracking))
            mlflow.set_tags({names.STUDY_TAG: study.study_name, names.STUDY_STORAGE_TAG: shown})
            mlflow.log_dict(cfg.model.search, names.SEARCH_SPACE_ARTIFACT)
            search(cfg.tune, study, functools.partial(run_trial, cfg, parent=parent))
            return finish(cfg, study, parent) if cfg.tune.retrain else None
    parent_id = parent_of(study, cfg.tune.join_timeout_s)
    log.info("joined study '%s' (MLflow parent run %s)", study.study_name, parent_id)
    adopt_worker_run(parent_id)
    search(cfg.tune, study, functools.partial(run_trial, cfg, parent=MlflowClient().get_run(parent_id)))
    if not cfg.tune.retrain:
        return None
    with mlflow.start_run(run_id=parent_id) as parent:
        return finish(cfg, study, parent)
