"""The train step on real AG News rows with the tiny model: tracking, model, resume and bad input."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from transformers import TrainerCallback

from agnews.checkpoints import CheckpointError
from agnews.config import PROJECT_ROOT, compose
from agnews.data import read_split, rows_sha256, split_train, stratified_sample
from agnews.errors import DataError, ModelError, PipelineError
from agnews.settings import Settings
from agnews.storage import open_storage
from agnews.tracking import step_run
from agnews.training import train
from agnews.upload import upload
from tests.helpers import LABELS, free_port, require_agnews

TINY = ["preset=test", "data.sample_size=400", "data.val_size=200", "data.test_size=200"]
RESUME = ["train.epochs=2", "data.sample_size=200", "data.val_size=100", "data.test_size=100"]  # after TINY


def tiny_cfg(root: Path, *overrides: str) -> Settings:
    return compose(
        [
            f"storage.uri={root / 'store'}",
            f"tracking.uri=sqlite:///{root / 'mlflow.db'}",
            f"train.output_dir={root / 'checkpoints'}",
            f"data.source={require_agnews()}",
            *TINY,
            *overrides,
        ]
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Settings, str, dict]:
    """One tiny training run on real rows, shared by the tests that inspect it."""
    root = tmp_path_factory.mktemp("train")
    # enough rows and epochs for the tiny model to beat chance, so that misaligned predictions would show
    cfg = tiny_cfg(root, "data.sample_size=1200", "train.epochs=2")
    upload(cfg.data, cfg.storage)
    with step_run(cfg, "train") as run:
        final = train(cfg)
    return cfg, run.info.run_id, final


def test_run_logs_metrics_plots_and_config(trained: tuple[Settings, str, dict]) -> None:
    cfg, run_id, final = trained
    mlflow.set_tracking_uri(cfg.tracking.uri)
    client = MlflowClient()
    run = client.get_run(run_id)
    metrics = run.data.metrics
    for key in [
        "test_accuracy",
        "test_f1_macro",
        "test_precision_sci_tech",
        "test_recall_world",
        "test_f1_business",
        "val_accuracy",
        "val_f1_macro",
        "best_val_accuracy",
        "train_samples_per_second",
        "train_loop_samples_per_second",
        "train_wall_time_s",
        "peak_rss_mb",
        "onnx_int8_accuracy",
        "onnx_int8_agreement",
        "behaviour_pass_rate",
        "behaviour_minimum_functionality_pass_rate",
        "onnx_int8_behaviour_invariance_pass_rate",
    ]:
        assert key in metrics, key
    assert (metrics["train_rows"], metrics["val_rows"], metrics["test_rows"]) == (1200, 200, 200)
    assert metrics["train_loop_samples_per_second"] > 0 and metrics["train_samples_per_second"] > 0
    assert metrics["test_f1_macro"] > 0.2  # predicts more than one class
    assert 0 <= metrics["test_accuracy"] <= 1 and metrics["test_accuracy"] == final["test_accuracy"]
    assert metrics["onnx_int8_agreement"] >= 0.9
    # validation chose the kept checkpoint: the best epoch's validation accuracy; test metrics are logged once
    val_history = client.get_metric_history(run_id, "val_accuracy")
    assert len(val_history) == 2  # one per epoch
    assert metrics["best_val_accuracy"] == pytest.approx(max(m.value for m in val_history))
    assert len(client.get_metric_history(run_id, "test_accuracy")) == 1
    assert run.data.tags["best_checkpoint"].startswith("checkpoint-")
    assert run.data.tags["dataset.test.rows"] == "200"
    test_split = read_split(open_storage(cfg.storage), cfg.storage.dataset_prefix, "test")
    scored = stratified_sample(test_split, 200, cfg.seed, "data.test_size").index  # line numbers in test.jsonl
    assert run.data.tags["dataset.test.rows_sha256"] == rows_sha256(scored)
    # the rows it trained, validated and was tested on are the run's dataset inputs ("Datasets used" in the UI)
    inputs = {
        next(tag.value for tag in entry.tags if tag.key == "mlflow.data.context"): entry.dataset
        for entry in run.inputs.dataset_inputs
    }
    assert sorted(inputs) == ["test", "training", "validation"]
    assert {context: json.loads(d.profile)["num_rows"] for context, d in inputs.items()} == {
        "training": 1200,
        "validation": 200,
        "test": 200,
    }
    sources = {context: json.loads(d.source)["uri"] for context, d in inputs.items()}
    train_url, test_url = (
        open_storage(cfg.storage).url(f"{cfg.storage.dataset_prefix}/{s}.jsonl") for s in ("train", "test")
    )
    assert sources == {"training": train_url, "validation": train_url, "test": test_url}
    assert len(client.get_metric_history(run_id, "loss")) >= 2  # logged every train.logging_steps
    assert client.get_metric_history(run_id, "learning_rate")
    assert run.data.params["train.max_length"] == "128" and run.data.params["model.name"] == "tiny-distilbert"
    assert len(run.data.tags["dataset.train.sha256"]) == 64 and run.data.tags["git_commit"]
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {
        "confusion_matrix.png",
        "classification_report.json",
        "misclassified.json",
        "behaviour_failures.json",
        "config.yaml",
    } <= artifacts
    png = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="confusion_matrix.png"))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = mlflow.artifacts.load_dict(f"runs:/{run_id}/classification_report.json")
    assert set(LABELS) <= set(report) and report["macro avg"]["support"] == 200
    # the test predictions line up with the test rows: the report's accuracy is the logged one
    assert report["accuracy"] == pytest.approx(metrics["test_accuracy"])


def test_logged_model_has_signature_example_and_bundle(trained: tuple[Settings, str, dict]) -> None:
    cfg, run_id, _ = trained
    mlflow.set_tracking_uri(cfg.tracking.uri)
    info = mlflow.models.get_model_info(f"runs:/{run_id}/model")
    assert info.signature.inputs.to_dict() == [{"type": "string", "required": True}]  # list or `text` column
    assert info.signature.outputs.input_names() == ["predicted_class", "confidence", *LABELS]
    local = Path(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/model"))
    assert (local / "input_example.json").is_file()
    requirements = (local / "requirements.txt").read_text()
    assert "torch==2.13.0" in requirements and "transformers==" in requirements
    bundle = local / "artifacts" / "serving"
    assert {p.name for p in bundle.iterdir()} == {"model.int8.onnx", "tokenizer.json", "config.json"}
    assert json.loads((bundle / "config.json").read_text())["labels"] == LABELS
    assert (local / "artifacts" / "model" / "model.safetensors").is_file()


def test_model_predicts_in_a_fresh_process(trained: tuple[Settings, str, dict]) -> None:
    cfg, run_id, _ = trained
    script = (
        "import sys, mlflow, pandas as pd\n"
        "mlflow.set_tracking_uri(sys.argv[1])\n"
        "model = mlflow.pyfunc.load_model(sys.argv[2])\n"
        "texts = ['Apple reported strong quarterly earnings with iPhone sales up 15%', 'Yankees win again']\n"
        "print(model.predict(pd.DataFrame({'text': texts})).to_json(orient='records'))\n"
        "print(model.predict(texts).to_json(orient='records'))\n"
    )
    out = (
        subprocess.run(
            [sys.executable, "-c", script, cfg.tracking.uri, f"runs:/{run_id}/model"],
            capture_output=True,
            text=True,
            check=True,
            cwd="/",
        )
        .stdout.strip()
        .splitlines()
    )
    for line in out[-2:]:
        rows = json.loads(line)
        assert len(rows) == 2
        for row in rows:
            assert row["predicted_class"] in LABELS
            assert sum(row[label] for label in LABELS) == pytest.approx(1, abs=1e-5)
            assert row["confidence"] == pytest.approx(max(row[label] for label in LABELS))


def test_mlflow_models_serve_answers_invocations(trained: tuple[Settings, str, dict], tmp_path: Path) -> None:
    cfg, run_id, _ = trained
    mlflow.set_tracking_uri(cfg.tracking.uri)
    local = mlflow.artifacts.download_artifacts(f"runs:/{run_id}/model", dst_path=str(tmp_path))
    port = free_port()
    # the scoring server is started as `uvicorn` from PATH: put this interpreter's bin folder first
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", local, "--env-manager", "local"]
    server = subprocess.Popen([*command, "-h", "127.0.0.1", "-p", str(port)], env=env, stdout=subprocess.DEVNULL)
    try:
        body = json.dumps({"dataframe_records": [{"text": "Stocks slid as oil prices jumped"}]}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": "application/json"}
        )
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    predictions = json.loads(response.read())["predictions"]
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "mlflow models serve did not start"
                time.sleep(1)
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert predictions[0]["predicted_class"] in LABELS
    assert set(LABELS) <= set(predictions[0])


class CrashAfterFirstCheckpoint(TrainerCallback):
    """Simulates a crash right after the first checkpoint is saved."""

    def on_save(self, args, state, control, **kwargs):
        raise KeyboardInterrupt("simulated crash")


@pytest.mark.integration
def test_resume_continues_from_the_last_checkpoint(tmp_path: Path) -> None:
    cfg = tiny_cfg(tmp_path, *RESUME)
    upload(cfg.data, cfg.storage)
    with pytest.raises(KeyboardInterrupt), step_run(cfg, "train"):
        train(cfg, callbacks=[CrashAfterFirstCheckpoint()])
    checkpoints = sorted((tmp_path / "checkpoints").glob("checkpoint-*"))
    assert len(checkpoints) == 1
    first_step = int(checkpoints[0].name.split("-")[1])

    resumed = tiny_cfg(tmp_path, *RESUME, "train.resume=true")
    with step_run(resumed, "train") as run:
        train(resumed)
    client = MlflowClient()
    tags = client.get_run(run.info.run_id).data.tags
    assert tags["resumed_from_checkpoint"].endswith(checkpoints[0].name)
    loss_steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert loss_steps and min(loss_steps) > first_step  # training picked up after the checkpoint
    assert client.get_run(run.info.run_id).data.metrics["epoch"] == 2


def test_stratified_sample_keeps_class_balance(agnews_dir: Path, tmp_path: Path) -> None:
    cfg = tiny_cfg(tmp_path)
    upload(cfg.data, cfg.storage)
    full = read_split(open_storage(cfg.storage), cfg.storage.dataset_prefix, "train")
    sample = stratified_sample(full, 1000, seed=7, name="data.sample_size")
    assert len(sample) == 1000
    expected = full.label.value_counts(normalize=True) * 1000
    assert (sample.label.value_counts() - expected).abs().max() <= 1
    assert sample.equals(stratified_sample(full, 1000, seed=7, name="data.sample_size"))  # seeded
    assert stratified_sample(full, 0, seed=7, name="data.sample_size") is full
    with pytest.raises(DataError, match=r"data.sample_size=30000 is larger than the 22260 rows"):
        stratified_sample(full, 30000, seed=7, name="data.sample_size")


def test_missing_dataset_says_run_upload_first(make_cfg) -> None:
    with pytest.raises(DataError, match=r"no dataset at .*: run the upload step first"):
        train(make_cfg(*TINY))


def test_unknown_model_and_unreachable_hub(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg(*TINY, f"data.source={require_agnews()}")
    upload(cfg.data, cfg.storage)
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelError, match="not a model folder"):
        train(make_cfg(*TINY, "model=distilbert", f"model.name={missing}"))
    with pytest.raises(ModelError, match="cannot load 'agnews-mlops/no-such-model'"):
        train(make_cfg(*TINY, "model=distilbert", "model.name=agnews-mlops/no-such-model", "model.hub_timeout_s=2"))


@pytest.mark.integration
def test_cli_sample_larger_than_data_and_server_down_fail_in_one_line(tmp_path: Path) -> None:
    base = [sys.executable, "-m", "steps.train", f"storage.uri={tmp_path / 'store'}", *TINY]
    cfg = tiny_cfg(tmp_path)
    upload(cfg.data, cfg.storage)
    too_big = subprocess.run(
        [*base, f"tracking.uri={cfg.tracking.uri}", "data.sample_size=99999"],
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
    )
    assert too_big.returncode == 1
    assert "error: data.sample_size=99999 is larger than the 22260 rows available" in too_big.stderr
    assert "Traceback" not in too_big.stderr

    # with no dataset either, the server is what it reports: it checks the server before data, model or training
    down = subprocess.run(
        [*base[:3], f"storage.uri={tmp_path / 'empty'}", *TINY, f"tracking.uri=http://127.0.0.1:{free_port()}"],
        capture_output=True,
        text=True,
        cwd=PROJECT_ROOT,
    )
    assert down.returncode == 1 and "error: no MLflow tracking server at http://127.0.0.1:" in down.stderr
    assert "Traceback" not in down.stderr and "upload" not in down.stderr


def test_predictions_frame_shape(trained: tuple[Settings, str, dict]) -> None:
    cfg, run_id, _ = trained
    mlflow.set_tracking_uri(cfg.tracking.uri)
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    frame = model.predict(pd.DataFrame({"text": ["one", "two", "three"]}))
    assert list(frame.columns) == ["predicted_class", "confidence", *LABELS] and len(frame) == 3


def test_model_layer_runs_against_a_logged_model(trained: tuple[Settings, str, dict]) -> None:
    """`pytest tests/model --model-uri ...` checks any MLflow model: here the run's own, through its tracking store
    (with no minimum pass rate: the tiny model is not meant to pass the behavioural checks)."""
    cfg, run_id, _ = trained
    command = ["tests/model", "--model-uri", f"runs:/{run_id}/model", "--min-pass-rate", "0", "-p", "no:cacheprovider"]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", *command],
        cwd=PROJECT_ROOT,
        env=os.environ | {"MLFLOW_TRACKING_URI": cfg.tracking.uri},
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "5 passed" in done.stdout.splitlines()[-1]


@pytest.mark.integration
def test_the_test_split_chooses_nothing(tmp_path: Path) -> None:
    """Two runs that differ only in the test labels keep the same checkpoint, by the same validation figures."""
    results = {}
    for name, shift in (("true", 0), ("shuffled", 1)):
        source = tmp_path / name / "source"
        source.mkdir(parents=True)
        (source / "train.csv").write_bytes((require_agnews() / "train.csv").read_bytes())
        test = (require_agnews() / "test.csv").read_text().splitlines(keepends=True)
        # every test label moved to the next class: a different test set, the same training and validation rows
        (source / "test.csv").write_text("".join(f'"{(int(line[1]) - 1 + shift) % 4 + 1}"{line[3:]}' for line in test))
        cfg = tiny_cfg(tmp_path / name, f"data.source={source}", "data.sample_size=1200", "train.epochs=2")
        upload(cfg.data, cfg.storage)
        with step_run(cfg, "train") as run:
            final = train(cfg)
        client = MlflowClient()
        history = [m.value for m in client.get_metric_history(run.info.run_id, "val_accuracy")]
        results[name] = (client.get_run(run.info.run_id).data.tags["best_checkpoint"], history, final)
    (kept, history, true), (kept_shuffled, history_shuffled, shuffled) = results.values()
    assert (kept, history) == (kept_shuffled, history_shuffled)
    assert true["best_val_accuracy"] == shuffled["best_val_accuracy"]
    assert true["test_accuracy"] != shuffled["test_accuracy"]  # the test sets did differ


def test_validation_comes_from_rows_the_training_sample_leaves(agnews_dir: Path, tmp_path: Path) -> None:
    cfg = tiny_cfg(tmp_path)
    upload(cfg.data, cfg.storage)
    full = read_split(open_storage(cfg.storage), cfg.storage.dataset_prefix, "train")
    sample, val = split_train(full, 1000, 300, seed=7)
    assert sample.equals(stratified_sample(full, 1000, seed=7, name="data.sample_size"))  # as without validation
    assert len(val) == 300 and not set(sample.text) & set(val.text)
    assert (val.label.value_counts() - full.label.value_counts(normalize=True) * 300).abs().max() <= 1
    everything, val_all = split_train(full, None, 300, seed=7)  # all rows: validation first, the rest trains
    assert len(everything) == len(full) - 300 and not set(everything.text) & set(val_all.text)
    with pytest.raises(
        DataError, match=r"data.sample_size=22200 is larger than the 21960 rows left after data.val_size=300"
    ):
        split_train(full, 22200, 300, seed=7)


# A train step that SIGKILLs itself while saving its second checkpoint, after the model's config.json and before the
# weights: the partial folder that a kill during a save leaves (only config.json).
KILLED_DURING_SAVE = """
import os, signal, sys
from transformers import Trainer
from agnews.config import compose
from agnews.tracking import step_run
from agnews.training import train

saves = []
save_model = Trainer.save_model

def save_then_die(self, output_dir=None, _internal_call=False):
    saves.append(output_dir)
    if _internal_call and len(saves) == 2:
        self.model.config.save_pretrained(output_dir)
        os.kill(os.getpid(), signal.SIGKILL)
    return save_model(self, output_dir, _internal_call)

Trainer.save_model = save_then_die
cfg = compose(sys.argv[1:])
with step_run(cfg, "train"):
    train(cfg)
"""


@pytest.mark.integration
def test_resume_after_a_kill_during_a_checkpoint_save(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The newest checkpoint is partial (kill -9 while saving): resume takes the newest complete one, says which, and
    tags the run that it continues."""
    cfg = tiny_cfg(tmp_path, *RESUME)
    upload(cfg.data, cfg.storage)
    overrides = [
        f"storage.uri={tmp_path / 'store'}",
        f"tracking.uri={cfg.tracking.uri}",
        f"train.output_dir={tmp_path / 'checkpoints'}",
        *TINY,
        *RESUME,
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "S3_BUCKET")}
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_DURING_SAVE, *overrides],
        cwd=PROJECT_ROOT,
        env=env | {"PYTHONPATH": str(PROJECT_ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    folders = sorted((tmp_path / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert len(folders) == 2
    complete, partial = folders
    assert [p.name for p in partial.iterdir()] == ["config.json"]
    client = MlflowClient(cfg.tracking.uri)
    (killed_run,) = client.search_runs([client.get_experiment_by_name("agnews").experiment_id])
    assert killed_run.info.status == "RUNNING"  # kill -9: nothing closed it

    caplog.set_level(logging.INFO, logger="agnews")
    resumed = tiny_cfg(tmp_path, *RESUME, "train.resume=true")
    with step_run(resumed, "train") as run:
        train(resumed)
    tags = client.get_run(run.info.run_id).data.tags
    assert tags["resumed_from_checkpoint"] == str(complete)
    assert tags["resumed_from_run"] == killed_run.info.run_id
    assert f"resuming from {complete} (run {killed_run.info.run_id})" in caplog.text
    assert f"removing {partial}: incomplete (no trainer_state.json)" in caplog.text
    first_step = int(complete.name.split("-")[1])
    loss_steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert loss_steps and min(loss_steps) > first_step
    assert client.get_run(run.info.run_id).data.metrics["epoch"] == 2
    assert (tmp_path / "checkpoints" / partial.name / "trainer_state.json").is_file()  # saved afresh


@pytest.mark.integration
def test_resume_with_no_complete_checkpoint_fails_in_one_line(tmp_path: Path) -> None:
    cfg = tiny_cfg(tmp_path, *RESUME, "train.resume=true")
    upload(cfg.data, cfg.storage)
    for step in (7, 14):
        folder = tmp_path / "checkpoints" / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        (folder / "config.json").write_text("{}")
    (tmp_path / "checkpoints" / "checkpoint-7" / "trainer_state.json").write_text('{"global_step": 7}')
    message = (
        f"train.resume=true, but no checkpoint in {tmp_path / 'checkpoints'} is complete (checkpoint-14: no "
        "trainer_state.json; checkpoint-7: no model weights): run without train.resume to start afresh"
    )
    with pytest.raises(CheckpointError) as caught:
        train(cfg)
    assert str(caught.value) == message and isinstance(caught.value, PipelineError)
    assert (tmp_path / "checkpoints" / "checkpoint-14").is_dir()  # nothing removed
