"""The predict step with the local engine: 10,000 AG News rows scored through the registered version's int8 bundle,
answers equal to the Lambda's, output committed whole or not at all, rows with errors counted, the run's figures.

The version is the tiny random model, trained and registered by the session's ``registered_tiny``; the Lambda is the
handler module serving that version's mirrored folder (the ``serve`` fixture).
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import boto3
import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient

from agnews.config import PROJECT_ROOT, compose
from agnews.errors import ConfigError
from agnews.names import CHAMPION
from agnews.scoring import rows
from agnews.scoring.job import (
    ERRORS,
    INPUT_CONTEXT,
    LISTING_ARTIFACT,
    MODEL_VERSION_TAG,
    OUTPUT_CONTEXT,
    OUTPUT_TAG,
    ROWS,
    ROWS_PER_SECOND,
    SHARE_PREFIX,
    Scored,
    checked,
    predict,
)
from agnews.scoring.output import SUCCESS
from agnews.scoring.rows import CONFIDENCE, ERROR, MANIFEST_SHA256, MODEL_NAME, MODEL_VERSION, PREDICTED_CLASS
from agnews.tracking import step_run
from tests.conftest import SCORING_ROWS
from tests.helpers import Invoker, read_scored, run_step

LAMBDA_TEXTS = 100


def run_predict(overrides: list[str], *more: str) -> tuple[Scored, str]:
    """The predict step in this process on ``overrides`` and ``more``: what it scored and its run id."""
    settings = compose([*overrides, *more])
    with step_run(settings, "predict") as run:
        done = predict(checked(settings.predict))
    return done, run.info.run_id


def cli(overrides: list[str], *more: str) -> subprocess.CompletedProcess:
    return run_step("predict", *overrides, *more)


def search_all_experiments() -> list[str]:
    return [experiment.experiment_id for experiment in MlflowClient().search_experiments()]


def errors(frame: pd.DataFrame) -> list[str | None]:
    return [error if isinstance(error, str) else None for error in frame[ERROR]]


def assert_one_line_error(done: subprocess.CompletedProcess, *words: str) -> None:
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "Traceback" not in done.stderr, done.stderr
    assert all(word in lines[-1] for word in words), lines[-1]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("Stocks up", None),
        ("", "the text is empty"),
        (" \n\t", "the text is only whitespace"),
        (None, "the text is missing"),
        (float("nan"), "the text is missing"),
        (7, "the text is a int"),
        (["a list"], "the text is a list"),
        ("x" * 11, "the text has 11 characters; the most is 10"),
        ("x" * 10, None),
    ],
)
def test_the_texts_that_get_no_prediction(text: object, problem: str | None) -> None:
    assert rows.problem(text, max_chars=10) == problem


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("predict.engine=gpu", "predict.engine=gpu is out of range: it must be one of local, spark"),
        ("predict.format=xml", "predict.format=xml is out of range"),
        ("predict.chunk_rows=0", "predict.chunk_rows=0 is out of range: it must be > 0"),
        ("predict.workers=-1", "predict.workers=-1 is out of range"),
        ("predict.model=runs:/abc/model", "it must be a models:/<name>/<version> or models:/<name>@<alias> URI"),
        ("predict.spark.partitions=-2", "predict.spark.partitions=-2 is out of range"),
    ],
)
def test_predict_settings_out_of_range_fail_at_composition(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        compose([override])


def test_local_engine_scores_10000_rows_as_the_lambda_answers_and_logs_one_run(
    scoring: list[str], agnews_rows: Path, tmp_path: Path, serve: Callable[..., Invoker]
) -> None:
    output = tmp_path / "scored"
    done, run_id = run_predict(scoring, f"predict.input={agnews_rows}", f"predict.output={output}")

    got = read_scored(output)
    texts = pd.read_parquet(agnews_rows).text.tolist()
    assert got.id.tolist() == list(range(SCORING_ROWS))
    labels = list(compose(scoring).data.labels)
    assert list(got.columns) == [
        "id",
        PREDICTED_CLASS,
        CONFIDENCE,
        *labels,
        MODEL_NAME,
        MODEL_VERSION,
        MANIFEST_SHA256,
        ERROR,
    ]
    assert got[ERROR].isna().all() and got[PREDICTED_CLASS].isin(labels).all()
    assert (got[CONFIDENCE] == got[labels].max(axis=1)).all()
    assert (got[MODEL_VERSION] == 1).all() and (got[MANIFEST_SHA256] == done.model.manifest_sha256).all()
    assert (output / SUCCESS).is_file()

    # the Lambda, serving the mirrored version, answers each of 100 texts exactly as the output's row says
    settings = compose(scoring)
    root = Path(settings.storage.uri) / settings.storage.model_prefix / settings.registry.model_name
    invoke = serve(root)
    for i in range(0, SCORING_ROWS, SCORING_ROWS // LAMBDA_TEXTS):
        response = invoke({"text": texts[i]})
        assert response["statusCode"] == 200, response
        body = response["body"]
        row = got.iloc[i]
        assert (body["model_version"], body["predicted_class"], body["confidence"]) == (
            1,
            row[PREDICTED_CLASS],
            row[CONFIDENCE],
        )
        assert body["probabilities"] == {label: row[label] for label in labels}

    # the run: its figures, the version, the input's listing and the output as datasets
    run = MlflowClient().get_run(run_id)
    metrics = run.data.metrics
    assert (metrics[ROWS], metrics[ERRORS]) == (SCORING_ROWS, 0) and metrics[ROWS_PER_SECOND] > 0
    shares = {label: metrics[f"{SHARE_PREFIX}{label}"] for label in labels}
    assert shares == {label: (got[PREDICTED_CLASS] == label).mean() for label in labels}
    assert run.data.tags[MODEL_VERSION_TAG] == "1" and run.data.tags[OUTPUT_TAG] == str(output)
    contexts = {i.tags[0].value: json.loads(i.dataset.source)["uri"] for i in run.inputs.dataset_inputs}
    assert contexts == {INPUT_CONTEXT: str(agnews_rows), OUTPUT_CONTEXT: str(output)}
    listing = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/{LISTING_ARTIFACT}")["files"]
    assert [(f["path"], f["bytes"]) for f in listing] == [("rows.parquet", agnews_rows.stat().st_size)]


def test_rows_with_errors_get_nulls_and_are_counted(scoring: list[str], tmp_path: Path) -> None:
    rows = [
        {"id": 0, "text": "Stocks rallied as the central bank held rates"},
        {"id": 1, "text": ""},
        {"id": 2, "text": "   "},
        {"id": 3, "text": None},
        {"id": 4, "text": 5},
        {"id": 5, "text": "x" * 51},
        {"id": 6},
        {"id": 7, "text": "Sports: the home team won again"},
    ]
    source = tmp_path / "rows.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    output = tmp_path / "scored"
    done, run_id = run_predict(
        scoring, f"predict.input={source}", f"predict.output={output}", "predict.max_chars=50", "predict.chunk_rows=3"
    )
    got = read_scored(output)
    assert errors(got) == [
        None,
        "the text is empty",
        "the text is only whitespace",
        "the text is missing",
        "the text is a int",
        "the text has 51 characters; the most is 50",
        "the text is missing",
        None,
    ]
    failed = got[ERROR].notna()
    assert got.loc[failed, [PREDICTED_CLASS, CONFIDENCE]].isna().all().all()
    assert got.loc[~failed, PREDICTED_CLASS].notna().all()
    assert (done.counts.rows, done.counts.errors) == (8, 6)
    metrics = MlflowClient().get_run(run_id).data.metrics
    assert (metrics[ROWS], metrics[ERRORS]) == (8, 6)


def test_csv_input_and_a_folder_of_files(scoring: list[str], tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    texts = ['Oil prices "jumped", traders said', "Line one\nline two of one text", ""]
    for n, text in enumerate(texts):
        pd.DataFrame({"id": [str(n)], "text": [text]}).to_csv(folder / f"part-{n}.csv", index=False)
    (folder / "_SUCCESS").write_text("")  # a marker of the writer's, not input
    output = tmp_path / "scored"
    done, _ = run_predict(scoring, f"predict.input={folder}", f"predict.output={output}")
    got = read_scored(output)
    assert got.id.tolist() == ["0", "1", "2"]  # CSV has no types: kept columns are strings
    assert errors(got) == [None, None, "the text is empty"]
    assert (done.counts.rows, done.counts.errors) == (3, 1)


def test_an_existing_output_is_refused_unless_overwrite(scoring: list[str], agnews_rows: Path, tmp_path: Path) -> None:
    source = tmp_path / "few.parquet"
    pd.read_parquet(agnews_rows).head(20).to_parquet(source)
    output = tmp_path / "scored"
    output.mkdir()
    (output / "kept.txt").write_text("not ours")
    refused = cli(scoring, f"predict.input={source}", f"predict.output={output}")
    assert_one_line_error(refused, str(output), "exists", "predict.overwrite=true")
    assert [p.name for p in output.iterdir()] == ["kept.txt"]

    done = cli(scoring, f"predict.input={source}", f"predict.output={output}", "predict.overwrite=true")
    assert done.returncode == 0, done.stderr
    assert len(read_scored(output)) == 20 and not (output / "kept.txt").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_job_killed_mid_way_leaves_no_output(scoring: list[str], agnews_rows: Path, tmp_path: Path) -> None:
    output = tmp_path / "scored"
    command = [sys.executable, "-m", "steps.predict", *scoring, f"predict.input={agnews_rows}"]
    command += [f"predict.output={output}", "predict.chunk_rows=50", "predict.workers=1"]
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "S3_BUCKET")}
    job = subprocess.Popen(command, cwd=PROJECT_ROOT, env=env, start_new_session=True, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    part = None
    while time.monotonic() < deadline and job.poll() is None:  # until the first chunks are in the staged file
        staged = list(tmp_path.glob(".scored.*.tmp/*.parquet"))
        if staged and staged[0].stat().st_size > 0:
            part = staged[0]
            break
        time.sleep(0.05)
    assert part is not None, f"the job never staged rows: {job.stderr.read_scored() if job.stderr else ''}"
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    assert not output.exists()

    # the leftover staging folder keeps no later job from writing the output
    source = tmp_path / "few.parquet"
    pd.read_parquet(agnews_rows).head(10).to_parquet(source)
    done = cli(scoring, f"predict.input={source}", f"predict.output={output}")
    assert done.returncode == 0, done.stderr
    assert len(read_scored(output)) == 10


def test_bad_input_column_format_or_version_fail_in_one_line(
    scoring: list[str], agnews_rows: Path, tmp_path: Path
) -> None:
    output = f"predict.output={tmp_path / 'scored'}"
    mlflow.set_tracking_uri(compose(scoring).tracking.uri)
    runs_before = len(MlflowClient().search_runs(search_all_experiments()))
    missing = cli(scoring, f"predict.input={tmp_path / 'nowhere.csv'}", output)
    assert_one_line_error(missing, "nowhere.csv", "no such file")

    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"not parquet at all")
    assert_one_line_error(cli(scoring, f"predict.input={garbage}", output), "garbage.parquet", "cannot be read")

    odd = tmp_path / "rows.txt"
    odd.write_text("text\nhello\n")
    assert_one_line_error(cli(scoring, f"predict.input={odd}", output), "rows.txt", "predict.format")

    no_column = cli(scoring, f"predict.input={agnews_rows}", output, "predict.text_column=body")
    assert_one_line_error(no_column, "no column 'body'", "predict.text_column")
    assert len(MlflowClient().search_runs(search_all_experiments())) == runs_before, "checked before a run is opened"

    name = compose(scoring).registry.model_name
    for model in (f"models:/{name}/99", f"models:/{name}@nobody", "models:/no-such-model@" + CHAMPION):
        unknown = cli(scoring, f"predict.input={agnews_rows}", output, f"predict.model={model}")
        assert_one_line_error(unknown, model)
    assert not (tmp_path / "scored").exists()


def test_s3_input_and_output(scoring: list[str], agnews_rows: Path, bucket: str, s3_env: str) -> None:
    s3 = boto3.client("s3", endpoint_url=s3_env)
    few = pd.read_parquet(agnews_rows).head(30)
    for n, part in enumerate((few.head(10), few.tail(20))):
        s3.put_object(Bucket=bucket, Key=f"news/part-{n}.parquet", Body=part.to_parquet())
    s3.put_object(Bucket=bucket, Key="news/_SUCCESS", Body=b"")
    output = f"s3://{bucket}/scored"
    done, run_id = run_predict(scoring, f"predict.input=s3://{bucket}/news", f"predict.output={output}")
    assert (done.counts.rows, done.counts.errors) == (30, 0)
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="scored/")["Contents"])
    assert keys == ["scored/_SUCCESS", "scored/part-00000.parquet"]
    assert [k for o in s3.list_objects_v2(Bucket=bucket)["Contents"] if "tmp" in (k := o["Key"])] == []
    got = pd.read_parquet(io.BytesIO(s3.get_object(Bucket=bucket, Key=keys[1])["Body"].read()))
    assert got.id.tolist() == list(range(30)) and got[PREDICTED_CLASS].notna().all()
    listing = mlflow.artifacts.load_dict(f"{MlflowClient().get_run(run_id).info.artifact_uri}/{LISTING_ARTIFACT}")
    assert [f["path"] for f in listing["files"]] == ["part-0.parquet", "part-1.parquet"]

    again = cli(scoring, f"predict.input=s3://{bucket}/news", f"predict.output={output}")
    assert_one_line_error(again, output, "exists")
