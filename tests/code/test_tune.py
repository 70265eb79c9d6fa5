"""The tune step on real AG News rows with the tiny model: the study as MLflow runs, the winner re-trained from its
recipe and registered, a crashing trial, two workers sharing a study on PostgreSQL, and a worker killed with -9."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from operator import attrgetter
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient
from mlflow.entities import Run

from agnews import config, data
from agnews.config import CONF_DIR, PROJECT_ROOT, compose
from agnews.errors import TuneError
from agnews.names import CHAMPION
from agnews.names import STUDY_PARENT_ATTR as PARENT_ATTR
from agnews.names import TRIAL_RUN_ATTR as RUN_ATTR
from agnews.names import TRIAL_STATE_TAG as STATE_TAG
from agnews.settings import Settings
from agnews.tuning import tune
from agnews.upload import upload
from tests.helpers import free_port, moto_environ

pytestmark = pytest.mark.integration  # studies that train their trials

# A few hundred rows and one epoch: a trial takes seconds.
QUICK = [
    "preset=test",
    "data.sample_size=160",
    "model.search.epochs={low:1,high:1}",
    "tune.startup_trials=2",
    "registry.min_accuracy=0",
    "registry.min_behaviour_pass_rate=0",
]
# A trial that lasts until it is killed.
ENDLESS = "model.search.epochs={low:1000,high:1000}"
NO_RETRAIN = "tune.retrain=false"  # workers that only run trials


def runs(tracking_uri: str, step: str, study: str | None = None) -> list[Run]:
    """The runs of ``step``; of ``study`` alone when given (the tests on one tracking server share its experiment)."""
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("agnews")
    of_study = f" AND tags.`tune.study` = '{study}'" if study else ""
    return client.search_runs([experiment.experiment_id], filter_string=f"tags.step = '{step}'{of_study}")


@pytest.fixture
def optuna_database(postgres: str) -> str:
    """A fresh database for Optuna on the throwaway PostgreSQL cluster (Optuna and MLflow both keep an
    alembic_version table, so a study never shares the tracking server's database)."""
    import psycopg2

    name = f"optuna_{uuid.uuid4().hex[:8]}"
    server, _, _ = postgres.rpartition("/")
    connection = psycopg2.connect(server.replace("postgresql+psycopg2", "postgresql") + "/postgres")
    connection.autocommit = True
    with connection.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE {name}")
    connection.close()
    return f"{server}/{name}"


def test_a_study_lands_as_a_parent_with_trial_children_and_registers_its_retrained_winner(
    make_cfg, agnews_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    conf = shutil.copytree(CONF_DIR, tmp_path / "conf")  # the project's config folder, where the recipe goes
    recipes = conf / "recipe"
    cfg = make_cfg(f"data.source={agnews_dir}", *QUICK, "tune.trials=3", f"tune.recipe_dir={recipes}")
    upload(cfg.data, cfg.storage)
    reads: list[str] = []

    def read_split(storage, prefix: str, split: str, info: dict | None = None):
        reads.append(split)
        return real_read_split(storage, prefix, split, info)

    real_read_split = data.read_split
    monkeypatch.setattr(data, "read_split", read_split)

    outcome = tune(cfg)

    assert reads.count("test") == 1 and reads.count("train") == 4  # three trials read no test rows; the re-train does
    (parent,) = runs(cfg.tracking.uri, "tune")
    study_name = parent.data.tags["tune.study"]
    study = optuna.load_study(study_name=study_name, storage=f"sqlite:///{tmp_path / 'mlflow' / 'optuna.db'}")
    assert study.user_attrs[PARENT_ATTR] == parent.info.run_id
    trials = {int(r.data.tags["trial.number"]): r for r in runs(cfg.tracking.uri, "tune-trial")}
    assert sorted(trials) == [t.number for t in study.trials] == [0, 1, 2]
    for trial in study.trials:
        run = trials[trial.number]
        assert run.info.run_id == trial.user_attrs[RUN_ATTR]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.data.tags[STATE_TAG] == trial.state.name == "COMPLETE"
        assert float(run.data.params["train.learning_rate"]) == trial.params["learning_rate"]
        assert run.data.metrics["best_val_accuracy"] == trial.value
        assert not [key for key in run.data.metrics if key.startswith("test_")]
    client = MlflowClient(cfg.tracking.uri)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"search_space.json", "best_params.json", f"{study_name}.yaml", "plots"} <= artifacts
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    names = ("optimization_history", "param_importances", "parallel_coordinate")
    assert plots == {f"plots/{name}.png" for name in names}
    assert parent.data.tags["tune.best_trial"] == str(study.best_trial.number)

    # the recipe is a config that `train` takes, and the registered model is the winner's re-train with it
    monkeypatch.setattr(config, "CONF_DIR", conf)
    recipe = compose(["model=tiny", f"recipe={study_name}"]).train
    assert {name: getattr(recipe, name) for name in study.best_params} == study.best_params
    retrained = client.get_run(parent.data.tags["child.train"])
    assert retrained.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert float(retrained.data.params["train.learning_rate"]) == study.best_params["learning_rate"]
    assert "test_accuracy" in retrained.data.metrics
    assert (outcome.version, outcome.alias) == (1, CHAMPION)
    assert client.get_model_version(cfg.registry.model_name, "1").run_id == retrained.info.run_id


def test_a_crashing_trial_is_recorded_failed_and_the_study_goes_on(make_cfg, agnews_dir: Path) -> None:
    # label smoothing above 1 is out of range: every trial fails, before it loads anything
    crash = "model.search.label_smoothing={low:1.5,high:1.6}"
    cfg = make_cfg(f"data.source={agnews_dir}", *QUICK, crash, "tune.trials=2")

    with pytest.raises(TuneError, match="has no complete trial"):
        tune(cfg)

    trials = runs(cfg.tracking.uri, "tune-trial")
    assert sorted(r.data.tags["trial.number"] for r in trials) == ["0", "1"]  # the second ran after the first crashed
    for run in trials:
        assert (run.info.status, run.data.tags[STATE_TAG]) == ("FAILED", "FAIL")
        assert run.data.tags["error"].startswith("ConfigError: train.label_smoothing=1.5")


def test_an_unreachable_study_storage_fails_in_one_line_without_its_password(make_cfg) -> None:
    cfg = make_cfg("model=tiny", f"tune.storage=postgresql+psycopg2://tuner:s3cret@127.0.0.1:{free_port()}/optuna")

    with pytest.raises(
        TuneError, match=r"^tune.storage=postgresql\+psycopg2://\*\*\*@127.0.0.1:\d+/optuna cannot be opened: "
    ) as error:
        tune(cfg)

    assert "s3cret" not in str(error.value) and "\n" not in str(error.value)


def worker(cfg: Settings, moto_server: str, log: Path, *overrides: str) -> subprocess.Popen:
    """``python -m steps.tune`` as its own process group, on ``cfg``'s tracking server, storage and study."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "S3_BUCKET", "MLFLOW_RUN_ID")}
    keys = ("tracking.uri", "storage.uri", "train.output_dir", "tune.storage", "tune.study", "tune.recipe_dir")
    settings = [f"{key}={attrgetter(key)(cfg)}" for key in keys]
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "steps.tune", *settings, *QUICK, *overrides],
            cwd=PROJECT_ROOT,
            env=env | moto_environ(moto_server),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


@pytest.fixture
def shared_study(make_cfg, agnews_dir: Path, mlflow_server: str, optuna_database: str, tmp_path: Path) -> Settings:
    """A study on PostgreSQL, tracked by a real `mlflow server`, with the data in a local store."""
    study = f"shared-{uuid.uuid4().hex[:8]}"
    overrides = (
        f"tracking.uri={mlflow_server}",
        f"tune.storage={optuna_database}",
        f"tune.study={study}",
        f"tune.recipe_dir={tmp_path / 'recipe'}",
    )
    cfg = make_cfg(f"data.source={agnews_dir}", *overrides)
    upload(cfg.data, cfg.storage)
    return cfg


def test_two_workers_share_one_study_on_postgresql(shared_study: Settings, moto_server: str, tmp_path: Path) -> None:
    cfg = shared_study
    workers = [worker(cfg, moto_server, tmp_path / f"worker-{n}.log", "tune.trials=4", NO_RETRAIN) for n in range(2)]
    for n, process in enumerate(workers):
        assert process.wait(timeout=1200) == 0, (tmp_path / f"worker-{n}.log").read_text()[-3000:]

    study = optuna.load_study(study_name=cfg.tune.study, storage=cfg.tune.storage)
    numbers = [t.number for t in study.trials]
    assert numbers == list(range(len(numbers))) and len(numbers) >= 4  # no number twice (a race may add one)
    (parent,) = runs(cfg.tracking.uri, "tune", cfg.tune.study)  # found by the second worker, not made again
    trial_runs = runs(cfg.tracking.uri, "tune-trial", cfg.tune.study)
    assert sorted(int(r.data.tags["trial.number"]) for r in trial_runs) == numbers  # one run per trial
    assert {r.info.run_id for r in trial_runs} == {t.user_attrs[RUN_ATTR] for t in study.trials}
    assert {r.data.tags["mlflow.parentRunId"] for r in trial_runs} == {parent.info.run_id}
    assert {r.data.tags["process.pid"] for r in trial_runs} <= {str(p.pid) for p in workers}
    states = {int(r.data.tags["trial.number"]): r.data.tags[STATE_TAG] for r in trial_runs}
    assert states == {t.number: t.state.name for t in study.trials}
    assert set(states.values()) <= {"COMPLETE", "PRUNED"}  # the median pruner may stop the fourth


def test_a_worker_killed_with_sigkill_leaves_its_trial_failed_and_another_finishes_the_study(
    shared_study: Settings, moto_server: str, tmp_path: Path
) -> None:
    cfg = shared_study
    doomed = worker(cfg, moto_server, tmp_path / "doomed.log", "tune.trials=2", "tune.heartbeat_s=1", ENDLESS)
    try:
        deadline = time.monotonic() + 600
        while not (running := [t for t in study_trials(cfg) if RUN_ATTR in t.user_attrs]):
            assert doomed.poll() is None and time.monotonic() < deadline, (tmp_path / "doomed.log").read_text()[-3000:]
            time.sleep(1)
    finally:
        os.killpg(doomed.pid, signal.SIGKILL)
        doomed.wait()
    time.sleep(3)  # past the grace period (twice the heartbeat) since its last heartbeat

    # it joins the study, runs the one trial left, then re-trains the winner and registers it under the same parent
    survivor = worker(cfg, moto_server, tmp_path / "survivor.log", "tune.trials=2", "tune.heartbeat_s=1")
    assert survivor.wait(timeout=1200) == 0, (tmp_path / "survivor.log").read_text()[-3000:]

    killed, after = study_trials(cfg)
    assert (killed.number, killed.state.name) == (running[0].number, "FAIL")
    assert after.state.name == "COMPLETE"
    client = MlflowClient(cfg.tracking.uri)
    lost = client.get_run(killed.user_attrs[RUN_ATTR])
    assert (lost.info.status, lost.data.tags[STATE_TAG]) == ("FAILED", "FAIL")
    assert "heartbeats" in lost.data.tags["error"]
    (parent,) = runs(cfg.tracking.uri, "tune", cfg.tune.study)
    assert parent.info.status == "FINISHED"  # the killed creator left it RUNNING; the survivor's finish closed it
    retrained = client.get_run(parent.data.tags["child.train"])
    assert float(retrained.data.params["train.learning_rate"]) == after.params["learning_rate"]
    assert client.get_model_version(cfg.registry.model_name, "1").run_id == retrained.info.run_id


def study_trials(cfg: Settings) -> list[optuna.trial.FrozenTrial]:
    try:
        return optuna.load_study(study_name=cfg.tune.study, storage=cfg.tune.storage).trials
    except KeyError:  # not created yet
        return []
