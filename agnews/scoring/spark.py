"""The Spark engine: Spark reads the input, ``mapInPandas`` scores each partition with the same ``rows.scored`` as the
local engine, and Spark's committer writes the parquet dataset to the staging folder beside the output, which
``output.Target`` then commits as it does the local engine's.

The bundle goes to each executor once (``SparkContext.addFile``) and is verified and loaded there once per Python
worker. The executors' Python needs the project's ``agnews`` and ``bundle`` packages and the extra ``spark``
(docs/batch-scoring.md: a cluster submit).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pyarrow as pa
from pyspark import SparkFiles
from pyspark.errors import PySparkException
from pyspark.sql import DataFrame, Observation, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.pandas.types import from_arrow_schema
from pyspark.sql.types import StructType

from agnews.errors import DataError
from agnews.scoring.rows import ERROR, PREDICTED_CLASS, Counts, Model, prediction_fields, scored
from agnews.scoring.source import Location, Source
from agnews.settings import PredictSettings, SparkSettings

APP_NAME = "agnews-predict"
ROWS = "rows"


def session(spark: SparkSettings) -> SparkSession:
    """The Spark session on ``predict.spark.master`` (unset: spark-submit's, or ``local[*]``); local workers run
    this Python."""
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = SparkSession.builder.appName(APP_NAME)
    if spark.master:
        builder = builder.master(spark.master)
    return builder.getOrCreate()


def hadoop_path(url: str) -> str:
    """A URL as Hadoop reads it: ``s3://`` through the S3A connector."""
    return "s3a://" + url.removeprefix("s3://") if url.startswith("s3://") else url


def read(spark: SparkSession, source: Source) -> DataFrame:
    """The input as Spark reads it: CSV with a header row and quoted newlines (every column a string), JSON lines,
    or parquet."""
    paths = [hadoop_path(url) for url in source.urls()]
    if source.format == "csv":
        return spark.read.csv(paths, header=True, multiLine=True, escape='"')
    if source.format == "json":
        return spark.read.json(paths)
    return spark.read.parquet(*paths)


def score_with_spark(settings: PredictSettings, source: Source, model: Model, staging: Location) -> Counts:
    """Score every row of ``source`` on the Spark master into ``staging``, committed by Spark's committer."""
    spark = session(settings.spark)
    keep, text = list(settings.keep_columns), settings.text_column
    max_chars = settings.max_chars
    spark.sparkContext.addFile(str(model.folder), recursive=True)
    shipped = model.folder.name
    try:
        frame = read(spark, source).select(*dict.fromkeys([*keep, text]))
        partitions = settings.spark.partitions or spark.sparkContext.defaultParallelism
        if settings.spark.partitions or frame.rdd.getNumPartitions() < partitions:  # every core gets rows
            frame = frame.repartition(partitions)
        predictions = from_arrow_schema(pa.schema(prediction_fields(model)))
        schema = StructType(frame.select(*keep).schema.fields + predictions.fields)

        def score_partition(frames: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
            here = Model(model.name, model.version, model.manifest_sha256, model.labels, Path(SparkFiles.get(shipped)))
            for part in frames:
                yield scored(part, here, text, keep, max_chars)

        observed = Observation(APP_NAME)  # the counts, gathered while the rows are written
        per_class = [F.count_if(F.col(PREDICTED_CLASS) == label).alias(label) for label in model.labels]
        frame.mapInPandas(score_partition, schema).observe(
            observed, F.count(F.lit(1)).alias(ROWS), F.count(ERROR).alias(ERROR), *per_class
        ).write.parquet(hadoop_path(staging.url))
        counts = observed.get
    except PySparkException as exc:
        raise DataError(f"Spark could not score {source.location.url}: {str(exc).splitlines()[0]}") from None
    finally:  # the next job's session ships its own bundle (a folder of the same name, from another place)
        spark.stop()
    classes = {label: int(counts[label]) for label in model.labels if counts[label]}
    return Counts(int(counts[ROWS]), int(counts[ERROR]), classes)
