"""The monitor step: captured answers (written by lambda/local.py) of a window against each version's reference
profile, live accuracy from labels, the verdict, its exit status, and a retrain on drift."""

from __future__ import annotations

import io
import json
import random
import re
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import boto3
import pandas as pd
import pytest
from mlflow import MlflowClient

from agnews.config import compose
from agnews.data import parse_csv
from agnews.errors import ConfigError, DataError
from agnews.monitoring.captures import read_window, window
from agnews.monitoring.labels import matched, read_labels
from agnews.names import MONITOR_VERDICT_TAG, REFERENCE_ARTIFACT
from agnews.storage import LocalStorage, open_storage
from bundle.capture import object_prefix, text_sha256
from bundle.layout import MANIFEST, REFERENCE, parse_manifest, sha256
from tests.conftest import register_trained
from tests.helpers import (
    MODEL_NAME,
    LocalServer,
    lambda_process,
    mirror_version,
    require_agnews,
    run_step,
    stored_folder,
)

DRIFT_STATUS = 3  # steps/monitor.py's exit status on drift
WINDOW_TEXTS = 400  # test-split texts per window


def serve_texts(
    model_root: Path, tmp_path: Path, texts: list[str], captures: str | None = None, **env: str
) -> tuple[str, str]:
    """Post ``texts`` to lambda/local.py serving ``model_root`` (its captures in its store, or in ``captures``), 20 a
    request; the window that holds their captures (since, until) as ISO times."""
    since = datetime.now(UTC)
    server = LocalServer(lambda_process(model_root, tmp_path) | env, *(["--captures", captures] if captures else []))
    try:
        for start in range(0, len(texts), 20):
            status, body = server.request(data=json.dumps({"texts": texts[start : start + 20]}).encode())
            assert status == 200, body
    finally:
        server.stop()
    return since.isoformat(), datetime.now(UTC).isoformat()  # every answer's time is before the server stopped


def monitor(overrides: list[str], *more: str) -> subprocess.CompletedProcess[str]:
    """``python -m steps.monitor`` in a process of its own, as a scheduler runs it."""
    return run_step("monitor", *overrides, *more, timeout=600)


def verdict_line(done: subprocess.CompletedProcess[str]) -> str:
    """The step's one line (its other lines are the INFO log's)."""
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("monitor: ") and "MLflow run" not in line]
    return line


def last_monitor_run(tracking_uri: str):
    client = MlflowClient(tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    (run,) = client.search_runs(
        experiments, "tags.step = 'monitor'", order_by=["attributes.start_time DESC"], max_results=1
    )
    return run


# ---- Settings and windows ----


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("monitor.window=0h", "monitor.window=0h is out of range: it must be <n>m, <n>h or <n>d"),
        ("monitor.window=1w", "monitor.window=1w is out of range"),
        ("monitor.since=yesterday", "monitor.since=yesterday is out of range: it must be an ISO 8601 time or null"),
        ("monitor.min_answers=0", "monitor.min_answers=0 is out of range: it must be > 0"),
        ("monitor.low_confidence=1.5", "monitor.low_confidence=1.5 is out of range: it must be in (0, 1)"),
        ("monitor.fail_on=always", "monitor.fail_on=always is out of range: it must be one of drift, never"),
        ("monitor.on_drift=page", "monitor.on_drift=page is out of range: it must be one of none, retrain"),
        ("monitor.max_accuracy_drop=2", "monitor.max_accuracy_drop=2 is out of range: it must be in [0, 1]"),
    ],
)
def test_monitor_settings_are_checked_at_composition(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        compose([override])


def test_the_window_is_the_last_hours_up_to_until_or_since_to_until() -> None:
    now = datetime(2026, 12, 5, 10, 30, tzinfo=UTC)
    last_day = window(compose([]).monitor, now)
    assert (last_day.since, last_day.until) == (now - timedelta(hours=24), now)
    assert len(last_day.hours()) == 25  # 10:00 yesterday to 10:00 today: one partition each
    named = window(compose(["monitor.since=2026-12-01T00:00", "monitor.until=2026-12-01T02:00Z"]).monitor, now)
    assert (named.since, named.until) == (datetime(2026, 12, 1, tzinfo=UTC), datetime(2026, 12, 1, 2, tzinfo=UTC))
    assert named.hours() == [datetime(2026, 12, 1, h, tzinfo=UTC) for h in (0, 1)]
    assert window(compose(["monitor.window=90m"]).monitor, now).since == now - timedelta(minutes=90)


# ---- Bad input ----


def test_lines_that_do_not_parse_are_counted_and_skipped(mirror_root: Path, tmp_path: Path) -> None:
    store = mirror_root.parent.parent
    texts = ["Stocks fell sharply on Monday", "The Lakers won again", "A new chip doubles battery life"]
    since, until = serve_texts(mirror_root, tmp_path, texts)
    folder = store / object_prefix(MODEL_NAME, datetime.fromisoformat(since))
    (good,) = folder.iterdir()
    line = json.loads(good.read_text())
    broken = json.dumps(line | {"version": "one"})
    (folder / "broken").write_text(f"{broken}\nnot json at all\n\n")
    (folder / ".half-written.part").write_text("{")  # a local write under way: not an object yet
    settings = compose([f"monitor.since={since}", f"monitor.until={until}", "monitor.bad_line_samples=1"]).monitor
    read = read_window(LocalStorage(store), MODEL_NAME, window(settings, datetime.now(UTC)), settings, 0)
    assert len(read.answers) == len(texts) and read.objects == 2
    assert read.bad.count == 2
    (sample,) = read.bad.samples
    assert "broken line 1" in sample and "'version' is str" in sample


def test_captures_and_labels_are_read_from_s3(mirror_root: Path, tmp_path: Path, s3_env: str, bucket: str) -> None:
    """lambda/local.py writing its captures to a bucket (the moto server), read back through the S3 store, and a
    labels file there, joined to them."""
    texts = ["Stocks fell sharply on Monday", "The Lakers won again"]
    since, until = serve_texts(mirror_root, tmp_path, texts, captures=f"s3://{bucket}/served")
    settings = compose([f"storage.uri=s3://{bucket}/served", f"monitor.since={since}", f"monitor.until={until}"])
    span = window(settings.monitor, datetime.now(UTC))
    read = read_window(open_storage(settings.storage), MODEL_NAME, span, settings.monitor, 0)
    assert len(read.answers) == len(texts) and read.objects == 1 and read.bad.count == 0
    body = "".join(json.dumps({"text_sha256": text_sha256(t), "label": "Sports"}) + "\n" for t in texts)
    boto3.client("s3", endpoint_url=s3_env).put_object(Bucket=bucket, Key="labels.jsonl", Body=body.encode())
    labels = read_labels(f"s3://{bucket}/labels.jsonl")
    assert matched(read.answers, labels) == len(texts) and labels.rows == len(texts)


@pytest.mark.integration
def test_an_empty_window_is_one_line_and_status_0(make_cfg, tmp_path: Path) -> None:
    overrides = [f"storage.uri={tmp_path / 'store'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    done = monitor(overrides, "monitor.since=2026-01-01T00:00", "monitor.until=2026-01-01T03:00")
    assert done.returncode == 0, done.stderr
    assert verdict_line(done).startswith("monitor: too few answers: no answers from 2026-01-01T00:00:00+00:00 to ")
    run = last_monitor_run(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert run.data.tags[MONITOR_VERDICT_TAG] == "too few answers" and run.data.metrics["answers"] == 0


@pytest.mark.integration
def test_a_version_without_reference_says_so(mirror_root: Path, tmp_path: Path) -> None:
    """Captures of a version that the tracking store has never registered: counted, described, not compared."""
    store = mirror_root.parent.parent
    since, until = serve_texts(mirror_root, tmp_path, ["Oil prices rose as supply fell"] * 5)
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = [f"storage.uri={store}", f"tracking.uri={tracking}", f"monitor.since={since}", f"monitor.until={until}"]
    done = monitor(overrides, "monitor.min_answers=5")
    assert done.returncode == 0, done.stderr
    assert f"v1 no reference: 5 answers (v1 of {MODEL_NAME} is not in the registry)" in verdict_line(done)
    run = last_monitor_run(tracking)
    assert run.data.tags[MONITOR_VERDICT_TAG] == "no reference" and run.data.metrics["v1.answers"] == 5


def test_a_labels_file_must_hold_hashes_and_labels(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    path.write_text("text_sha256,label\nnot-a-hash,World\n")
    with pytest.raises(DataError, match=r"row 1: 'not-a-hash' is not a sha256 hex digest"):
        read_labels(str(path))
    path.write_text("sha,label\n")
    with pytest.raises(DataError, match="no text_sha256 column"):
        read_labels(str(path))
    lines = tmp_path / "labels.jsonl"
    lines.write_text(json.dumps({"text_sha256": "A" * 64, "label": "Sports"}) + "\n")
    assert read_labels(str(lines)).by_digest == {bytes.fromhex("a" * 64): "Sports"}


# ---- End to end: a tiny model trained, registered and served by lambda/local.py ----

# The tiny model trained well enough to tell from chance (about 0.45 test accuracy against 0.25).
TRAIN = ["preset=test", "data.val_size=200", "data.test_size=200", "data.sample_size=1200", "train.epochs=2"]


@dataclass(frozen=True)
class Served:
    overrides: list[str]
    tracking_uri: str
    model_root: Path
    texts: list[str]  # the first window's
    labels: list[str]
    first: tuple[str, str]  # (since, until)
    longer: tuple[str, str]  # texts four times as long, with the texts captured


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Served:
    """Upload, train (which logs the reference profile) and register a tiny model as @champion, mirrored to local
    storage; then serve it with lambda/local.py: a window of test-split texts, and a window of longer texts."""
    root = tmp_path_factory.mktemp("monitor")
    overrides = register_trained(root, *TRAIN)
    cfg = compose(overrides)
    tracking = cfg.tracking.uri
    model_root = root / "store" / "models" / MODEL_NAME
    test = parse_csv(require_agnews() / "test.csv", 4).sample(WINDOW_TEXTS, random_state=1)
    labels = cfg.data.labels
    texts = test.text.tolist()
    first = serve_texts(model_root, root, texts)
    longer = serve_texts(model_root, root, [" ".join([text] * 4) for text in texts], CAPTURE_TEXT="true")
    return Served(overrides, tracking, model_root, texts, [labels[i] for i in test.label], first, longer)


def window_of(span: tuple[str, str]) -> list[str]:
    return [f"monitor.since={span[0]}", f"monitor.until={span[1]}"]


@pytest.mark.integration
def test_the_served_texts_are_ok_and_longer_texts_drift(served: Served, tmp_path: Path) -> None:
    client = MlflowClient(served.tracking_uri)
    run_id = client.get_model_version(MODEL_NAME, "1").run_id
    logged = Path(client.download_artifacts(run_id, REFERENCE_ARTIFACT, str(tmp_path))).read_bytes()
    assert len(pd.read_parquet(io.BytesIO(logged))) == 200  # data.val_size: the validation split, through the bundle
    folder = stored_folder(served.model_root, 1)  # the mirror's copy beside the bundle, its digest in the manifest
    assert (folder / REFERENCE).read_bytes() == logged
    assert parse_manifest((folder / MANIFEST).read_bytes()).reference == sha256(logged)

    done = monitor(served.overrides, *window_of(served.first))
    assert done.returncode == 0, done.stdout + done.stderr
    assert verdict_line(done).startswith(f"monitor: ok: v1 ok: {WINDOW_TEXTS} answers")
    run = last_monitor_run(served.tracking_uri)
    assert run.data.tags[MONITOR_VERDICT_TAG] == "ok"
    assert run.data.metrics["v1.answers"] == WINDOW_TEXTS and run.data.metrics["v1.drifted_share"] < 0.5
    assert sum(v for k, v in run.data.metrics.items() if k.startswith("v1.class_share.")) == pytest.approx(1)
    assert 0 < run.data.metrics["v1.mean_confidence"] < 1
    assert {"drift/v1-answers.html", "monitor.json"} <= {a.path for a in client.list_artifacts(run.info.run_id)} | {
        a.path for a in client.list_artifacts(run.info.run_id, "drift")
    }
    assert client.get_model_version(MODEL_NAME, "1").tags[MONITOR_VERDICT_TAG] == "ok"

    done = monitor(served.overrides, *window_of(served.longer))
    assert done.returncode == DRIFT_STATUS, done.stdout + done.stderr
    assert verdict_line(done).startswith(f"monitor: drift: v1 drift: {WINDOW_TEXTS} answers, drifted on ")
    run = last_monitor_run(served.tracking_uri)
    drifted = run.data.tags["v1.drifted_columns"].split(",")
    assert {"tokens", "text length", "words"} <= set(drifted)  # the texts were captured: their descriptors too
    assert all(run.data.metrics[f"v1.drifted.{column}"] == 1 for column in drifted)
    assert run.data.tags[MONITOR_VERDICT_TAG] == "drift"
    assert client.get_model_version(MODEL_NAME, "1").tags[MONITOR_VERDICT_TAG] == "drift"
    assert "drift/v1-texts.html" in {a.path for a in client.list_artifacts(run.info.run_id, "drift")}


def write_labels(path: Path, texts: list[str], labels: list[str], unknown: int = 0) -> Path:
    rows = [{"text_sha256": text_sha256(text), "label": label} for text, label in zip(texts, labels, strict=True)]
    rows += [{"text_sha256": f"{random.Random(i).getrandbits(256):064x}", "label": "World"} for i in range(unknown)]
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


@pytest.mark.integration
def test_live_accuracy_lies_within_its_interval_of_the_test_accuracy(served: Served, tmp_path: Path) -> None:
    labels = write_labels(tmp_path / "labels.csv", served.texts, served.labels, unknown=7)
    done = monitor(served.overrides, *window_of(served.first), f"monitor.labels={labels}")
    assert done.returncode == 0, done.stdout + done.stderr
    metrics = last_monitor_run(served.tracking_uri).data.metrics
    assert metrics["labels.rows"] == WINDOW_TEXTS + 7 and metrics["labels.matched"] == len(set(served.texts))
    assert metrics["v1.labelled"] == WINDOW_TEXTS
    assert metrics["v1.live_accuracy_low"] <= metrics["v1.test_accuracy"] <= metrics["v1.live_accuracy_high"]
    assert "live accuracy" in verdict_line(done) and "a drop" not in verdict_line(done)


@pytest.mark.integration
def test_a_model_trained_on_shuffled_labels_served_instead_is_flagged(served: Served, tmp_path: Path) -> None:
    """The version's registered test accuracy, but the answers of a model trained on shuffled labels (a bad
    deployment): its live accuracy on labelled answers falls far below, and the drop is flagged."""
    import mlflow

    from agnews.tracking import step_run
    from agnews.training import train

    data = tmp_path / "shuffled"
    data.mkdir()
    train_rows = pd.read_csv(require_agnews() / "train.csv", header=None).head(3000)
    train_rows[0] = train_rows[0].sample(frac=1, random_state=0).to_numpy()
    train_rows.to_csv(data / "train.csv", header=False, index=False)
    (data / "test.csv").symlink_to(require_agnews() / "test.csv")
    overrides = [
        *served.overrides,
        f"data.source={data}",
        f"storage.uri={tmp_path / 'data'}",
        "tracking.experiment=shuffled",
    ]
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        from agnews.upload import upload_and_log

        cfg = compose(overrides)
        with step_run(cfg, "upload"):
            upload_and_log(cfg)
        with step_run(cfg, "train") as run:
            train(cfg)
        bundle = Path(mlflow.artifacts.download_artifacts(f"runs:/{run.info.run_id}/model")) / "artifacts" / "serving"
    shuffled_root = mirror_version(bundle, tmp_path / "served" / "models" / MODEL_NAME, 1).parent
    span = serve_texts(shuffled_root, tmp_path, served.texts)
    labels = write_labels(tmp_path / "labels.csv", served.texts, served.labels)
    done = monitor(
        [*served.overrides, f"storage.uri={tmp_path / 'served'}"],
        *window_of(span),
        f"monitor.labels={labels}",
        "monitor.max_accuracy_drop=0.1",
        "monitor.fail_on=never",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "a drop" in verdict_line(done)
    run = last_monitor_run(served.tracking_uri)
    assert run.data.tags["v1.accuracy_drop"] == "true" and run.data.tags[MONITOR_VERDICT_TAG] == "drift"
    assert run.data.metrics["v1.test_accuracy"] - run.data.metrics["v1.live_accuracy"] > 0.1


@pytest.mark.integration
def test_on_drift_retrain_runs_main_as_a_child_whose_model_goes_through_the_gate(served: Served) -> None:
    done = monitor(
        served.overrides,
        *window_of(served.longer),
        "monitor.on_drift=retrain",
        "monitor.fail_on=never",
        "data.sample_size=300",
        "train.epochs=1",
        "registry.min_accuracy=0.99",  # a gate that the retrained tiny model cannot pass
    )
    assert done.returncode == 0, done.stdout + done.stderr
    line = verdict_line(done)
    assert "retrained: the main run registered v2 as @challenger" in line
    client = MlflowClient(served.tracking_uri)
    parent = last_monitor_run(served.tracking_uri)
    (main,) = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}' AND tags.step = 'main'"
    )
    assert main.data.tags["registered_alias"] == "challenger" and main.data.tags["registered_version"] == "2"
    assert client.get_registered_model(MODEL_NAME).aliases == {"champion": 1, "challenger": 2}
    assert parent.data.tags["monitor.retrained.registered_version"] == "2"
