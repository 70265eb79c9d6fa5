"""MLproject entry points, through MLflow's own loader and parameter substitution, and Hydra's footprint."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from operator import attrgetter
from pathlib import Path

import pytest
from mlflow.projects._project_spec import load_project
from mlflow.tracking import MlflowClient

from agnews.config import PROJECT_ROOT, compose, split_overrides

# `webhook` has a subcommand first
HYDRA_ENTRY_POINTS = ["upload", "train", "register", "mirror", "main", "cleanup", "tune", "monitor", "predict"]
ENTRY_POINTS = [*HYDRA_ENTRY_POINTS, "webhook", "history", "rollout"]
OVERRIDES = "data.sample_size=1000 train.epochs=1"


def command(entry_point: str, **parameters: str) -> str:
    """The shell command `mlflow run . -e <entry_point> -P ...` would execute."""
    return load_project(str(PROJECT_ROOT)).get_entry_point(entry_point).compute_command(parameters, None)


def test_entry_points_are_python_modules() -> None:
    project = load_project(str(PROJECT_ROOT))
    assert sorted(project._entry_points) == sorted(ENTRY_POINTS)
    for name, entry_point in project._entry_points.items():
        assert entry_point.command.startswith(f"python -m steps.{name} "), name
        assert entry_point.parameters["overrides"].type == "string"
        assert entry_point.parameters["overrides"].default == ""


@pytest.mark.parametrize("entry_point", HYDRA_ENTRY_POINTS)
def test_overrides_parameter_applies_every_override(entry_point: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow quotes `overrides` as one word; the step splits it, and drops named parameters left empty."""
    monkeypatch.delenv("S3_BUCKET", raising=False)
    argv = shlex.split(command(entry_point, overrides=OVERRIDES))
    assert argv[:3] == ["python", "-m", f"steps.{entry_point}"]
    assert OVERRIDES in argv
    cfg, default = compose(argv[3:]), compose()
    assert (cfg.data.sample_size, cfg.train.epochs) == (1000, 1)
    for key in ("data.source", "model.name", "registry.run_id", "registry.version"):
        assert attrgetter(key)(cfg) == attrgetter(key)(default), key


def test_webhook_entry_point_registers_the_receiver_with_every_override() -> None:
    from steps.webhook import parse

    argv = shlex.split(command("webhook", url="http://receiver:8088/", overrides=f"{OVERRIDES} registry.model_name=m"))
    assert argv[:3] == ["python", "-m", "steps.webhook"]
    args = parse(argv[3:])
    assert (args.command, args.url) == ("register", "http://receiver:8088/")
    # MLflow passes the parameter as one quoted word; the step splits it as every step does
    assert split_overrides(args.overrides) == [*OVERRIDES.split(), "registry.model_name=m"]
    assert parse(shlex.split(command("webhook"))[3:]).url == "", "no URL: the step says it needs one"


def test_named_parameters() -> None:
    cfg = compose(shlex.split(command("train", model="tiny", sample_size="300", epochs="2"))[3:])
    assert (cfg.model.name, cfg.data.sample_size, cfg.train.epochs) == ("tiny-distilbert", 300, 2)
    cfg = compose(shlex.split(command("main", source="../x", overrides="seed=7 data.test_size=500"))[3:])
    assert (cfg.data.source, cfg.seed, cfg.data.test_size) == ("../x", 7, 500)
    cfg = compose(shlex.split(command("tune", model="minilm", trials="12", overrides="tune.study=s"))[3:])
    assert (cfg.model.search["epochs"]["high"], cfg.tune.trials, cfg.tune.study) == (3, 12, "s")
    cfg = compose(shlex.split(command("predict", input="in.csv", output="out/", engine="spark"))[3:])
    assert (cfg.predict.input, cfg.predict.output, cfg.predict.engine) == ("in.csv", "out/", "spark")
    assert cfg.predict.model == compose().predict.model == "models:/distilbert-agnews@champion"


@pytest.mark.integration
def test_upload_command_runs_as_mlflow_run_runs_it(tmp_path: Path, mlflow_db: Path) -> None:
    """The computed `upload` command, run as MLflow Projects' local backend runs it: by a shell, from an empty
    folder, inside the run that MLflow started (here in the Default experiment). Overrides reach the logged params,
    and Hydra writes nothing."""
    source = tmp_path / "source"
    source.mkdir()
    for split in ("train", "test"):
        (source / f"{split}.jsonl").write_text(json.dumps({"text": f"a {split} text", "label": 1}) + "\n")
    tracking = f"sqlite:///{shutil.copy(mlflow_db, tmp_path)}"
    client = MlflowClient(tracking)
    started = client.create_run("0").info.run_id
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = {key: value for key, value in os.environ.items() if key != "S3_BUCKET"}
    env.update(
        PYTHONPATH=str(PROJECT_ROOT), MLFLOW_TRACKING_URI=tracking, MLFLOW_RUN_ID=started, MLFLOW_EXPERIMENT_ID="0"
    )
    overrides = f"{OVERRIDES} storage.uri={tmp_path / 'store'}"
    shell = command("upload", source=str(source), overrides=overrides).replace("python", shlex.quote(sys.executable), 1)
    done = subprocess.run(shell, shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert list(cwd.iterdir()) == [], "Hydra wrote into the working folder"
    assert "logging into experiment 'Default', not 'agnews': pass `--experiment-name agnews`" in done.stdout
    assert (tmp_path / "store" / "datasets" / "ag_news" / "info.json").is_file()
    run = client.get_run(started)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert (params["data.sample_size"], params["train.epochs"], params["data.source"]) == ("1000", "1", str(source))
    assert params["tracking.uri"] == tracking


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["data.sample_size=1000 train.epochs=1"], ["data.sample_size=1000", "train.epochs=1"]),
        (["data.source=/data/ag news"], ["data.source=/data/ag news"]),  # a value with a space stays whole
        (["data.source='/data/ag news' seed=3"], ["data.source=/data/ag news", "seed=3"]),
        (["+train.extra=1 ++seed=2 ~data.test_size"], ["+train.extra=1", "++seed=2", "~data.test_size"]),
        (["", "model=", "data.sample_size="], []),  # unset MLproject parameters
        (["tune.trials=", "tune.storage=", "tune.study="], ["tune.storage=", "tune.study="]),  # blanks of no parameter
        (["data.source='unbalanced"], ["data.source='unbalanced"]),  # left for Hydra to report
    ],
)
def test_split_overrides(args: list[str], expected: list[str]) -> None:
    assert split_overrides(args) == expected
