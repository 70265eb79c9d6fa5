"""The predict step's Spark engine on local mode (``local[2]``): the same 10,000 AG News rows scored as the local
engine scores them, row for row, and rows with errors counted. Marked spark: `make test-spark`, with the extra."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from agnews.config import compose
from agnews.scoring.job import ERRORS, ROWS, Scored, checked, predict
from agnews.scoring.output import SUCCESS
from agnews.scoring.rows import ERROR, PREDICTED_CLASS
from agnews.tracking import step_run
from tests.conftest import SCORING_ROWS
from tests.helpers import read_scored

pytestmark = pytest.mark.spark
pytest.importorskip("pyspark", reason="the extra `spark`: pip install -e '.[spark]'")

SPARK = ["predict.engine=spark", "predict.spark.master=\"'local[2]'\""]  # Hydra takes brackets quoted


def run_predict(overrides: list[str]) -> Scored:
    settings = compose(overrides)
    with step_run(settings, "predict"):
        return predict(checked(settings.predict))


def test_spark_scores_10000_rows_as_the_local_engine_does(
    scoring: list[str], agnews_rows: Path, tmp_path: Path
) -> None:
    on_spark, locally = tmp_path / "spark", tmp_path / "local"
    spark = run_predict([*scoring, *SPARK, f"predict.input={agnews_rows}", f"predict.output={on_spark}"])
    local = run_predict([*scoring, f"predict.input={agnews_rows}", f"predict.output={locally}"])

    assert (on_spark / SUCCESS).is_file() and len(list(on_spark.glob("part-*.parquet"))) >= 2  # both cores scored
    got, expected = read_scored(on_spark), read_scored(locally)
    assert len(got) == SCORING_ROWS
    pd.testing.assert_frame_equal(got, expected)  # every column of every row, probabilities bit for bit
    assert (spark.counts.rows, spark.counts.errors, spark.counts.classes) == (
        local.counts.rows,
        local.counts.errors,
        local.counts.classes,
    )
    assert spark.model.manifest_sha256 == local.model.manifest_sha256
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_spark_counts_rows_with_errors(scoring: list[str], tmp_path: Path) -> None:
    texts = ["Stocks rallied as the central bank held rates", "", "   ", None, "x" * 51, "The home team won"]
    source = tmp_path / "rows.parquet"
    pd.DataFrame({"id": range(len(texts)), "text": texts}).to_parquet(source)
    output = tmp_path / "scored"
    done = run_predict(
        [*scoring, *SPARK, f"predict.input={source}", f"predict.output={output}", "predict.max_chars=50"]
    )
    got = read_scored(output)
    failed = got[ERROR].notna()
    assert failed.tolist() == [False, True, True, True, True, False]
    assert got.loc[failed, PREDICTED_CLASS].isna().all() and got.loc[~failed, PREDICTED_CLASS].notna().all()
    assert (done.counts.rows, done.counts.errors) == (6, 4)
    assert sum((done.counts.classes or {}).values()) == 2
    assert done.metrics()[ROWS] == 6 and done.metrics()[ERRORS] == 4
