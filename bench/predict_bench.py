"""Batch scoring, as ratios measured in one run: the predict step's local engine against the torch pyfunc's
``predict`` on the same CPUs, Spark ``local[2]`` against ``local[1]``, and the Spark engine (the int8 bundle through
``mapInPandas``) against ``mlflow.pyfunc.spark_udf`` over the torch pyfunc on the same master; and the peak memory
of each worker process.

    python bench/predict_bench.py tracking.uri=sqlite:///mlflow/mlflow.db [more overrides...] --rows 100000

It scores ``predict.model`` (by default ``models:/<registry.model_name>@champion``: train and register first) on the
first ``--rows`` texts of AG News' train split (title and description, as the pipeline builds them; repeated if
``--rows`` is larger), read from ``--agnews``. The torch pyfunc is slow enough that it scores ``--pyfunc-rows`` of
them, in this process on every CPU it may use, and ``spark_udf`` ``--udf-rows``; each figure is rows per second, so
that the ratios compare rates. A tiny setup runs in minutes: register ``preset=test`` into a scratch store, then
``--rows 300 --pyfunc-rows 100 --udf-rows 100 --output /tmp/p.json``.

- local: ``predict.engine=local``, a process per usable CPU (``predict.workers=0``), ``predict.chunk_rows`` rows a
  chunk, from the parquet file to a parquet dataset, the workers' start included;
- spark: ``predict.engine=spark`` on ``local[1]`` and ``local[2]`` (each its own session, started inside the
  timing, after a first session that starts the JVM outside it), ``predict.spark.partitions`` set to the master's
  cores so that each core scores;
- spark_udf: ``mlflow.pyfunc.spark_udf`` over the registered torch pyfunc on ``local[2]``, the predicted class and
  confidence of each row written to Spark's ``noop`` sink;
- peak memory: the largest resident set of each worker process (the local engine's, Spark's Python workers, and the
  JVM), sampled every ``SAMPLE_S`` seconds.

The machine (bench/machine.py) and the load average before and after are recorded: figures count only from a run
alone on the machine. Figures go to bench/results/predict.json (``--output`` elsewhere).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd
import psutil
from machine import machine

from agnews.config import PROJECT_ROOT, compose
from agnews.data import parse_csv
from agnews.scoring.job import score
from agnews.scoring.model import fetch
from agnews.scoring.output import target
from agnews.scoring.rows import CONFIDENCE, PREDICTED_CLASS, Model
from agnews.scoring.source import open_source
from agnews.scoring.spark import session
from agnews.settings import PredictSettings
from agnews.tracking import connect

RESULTS = Path(__file__).resolve().parent / "results"
SAMPLE_S = 0.1
MIB = 1024 * 1024
TARGETS = {"local_vs_pyfunc": 5.0, "spark_2_vs_1": 1.7, "spark_bundle_vs_spark_udf": 5.0}


class PeakMemory:
    """The largest RSS of each process below this one while the block runs, by kind: ``worker`` (a Python process:
    the local engine's or Spark's), ``jvm`` (Spark's driver)."""

    def __init__(self) -> None:
        self.peaks: dict[int, tuple[str, int]] = {}
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._done.wait(SAMPLE_S):
            for process in psutil.Process().children(recursive=True):
                try:
                    rss = process.memory_info().rss
                    kind = "jvm" if "java" in process.name() else "worker"
                    if "resource_tracker" in " ".join(process.cmdline()):
                        continue
                except psutil.Error:
                    continue
                self.peaks[process.pid] = (kind, max(rss, self.peaks.get(process.pid, (kind, 0))[1]))

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def mib(self, kind: str) -> float | None:
        found = [rss for k, rss in self.peaks.values() if k == kind]
        return round(max(found) / MIB, 1) if found else None


def rows_file(agnews: Path, rows: int, folder: Path) -> Path:
    """The first ``rows`` AG News train texts (repeated past the split's end) as parquet: ``id`` and ``text``."""
    texts = parse_csv(agnews / "train.csv", 4).text
    repeated = pd.concat([texts] * (rows // len(texts) + 1), ignore_index=True).head(rows)
    path = folder / f"rows-{rows}.parquet"
    pd.DataFrame({"id": range(rows), "text": repeated}).to_parquet(path)
    return path


def engine_rate(settings: PredictSettings, model: Model, source: Path, output: Path) -> dict[str, Any]:
    """Rows per second of one predict job with ``settings`` over ``source``, and its workers' peak memory."""
    settings = replace(settings, input=str(source), output=str(output), overwrite=True, progress=False)
    found, place = open_source(settings), target(settings.output, True)
    with PeakMemory() as memory:
        started = time.perf_counter()
        counts = score(settings, found, model, place)
        place.commit(True)
        seconds = time.perf_counter() - started
    return {
        "rows": counts.rows,
        "seconds": round(seconds, 2),
        "rows_per_s": round(counts.rows / seconds, 1),
        "peak_worker_mib": memory.mib("worker"),
        "peak_jvm_mib": memory.mib("jvm"),
    }


def pyfunc_rate(uri: str, texts: list[str]) -> dict[str, Any]:
    """Rows per second of the torch pyfunc's ``predict`` on ``texts``, in this process (its load not counted)."""
    import mlflow
    import torch

    model = mlflow.pyfunc.load_model(uri)
    model.predict(pd.DataFrame({"text": texts[:8]}))  # warm-up
    rss_before = psutil.Process().memory_info().rss
    started = time.perf_counter()
    model.predict(pd.DataFrame({"text": texts}))
    seconds = time.perf_counter() - started
    return {
        "rows": len(texts),
        "seconds": round(seconds, 2),
        "rows_per_s": round(len(texts) / seconds, 1),
        "torch_threads": torch.get_num_threads(),
        "rss_mib": round(max(rss_before, psutil.Process().memory_info().rss) / MIB, 1),
    }


def spark_udf_rate(uri: str, source: Path, rows: int, master: str) -> dict[str, Any]:
    """Rows per second of ``mlflow.pyfunc.spark_udf`` over the torch pyfunc on ``rows`` of ``source`` (session
    start and the UDF's model download included, as in the engine's figure)."""
    import mlflow
    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    with PeakMemory() as memory:
        started = time.perf_counter()
        spark = SparkSession.builder.master(master).appName("agnews-predict-bench-udf").getOrCreate()
        try:
            cores = spark.sparkContext.defaultParallelism
            frame = spark.read.parquet(str(source)).limit(rows).repartition(cores)
            udf = mlflow.pyfunc.spark_udf(
                spark, uri, result_type=f"{PREDICTED_CLASS} string, {CONFIDENCE} double", env_manager="local"
            )
            frame.select(udf("text").alias("prediction")).write.format("noop").mode("overwrite").save()
            seconds = time.perf_counter() - started
        finally:
            spark.stop()
    return {
        "rows": rows,
        "seconds": round(seconds, 2),
        "rows_per_s": round(rows / seconds, 1),
        "peak_worker_mib": memory.mib("worker"),
        "peak_jvm_mib": memory.mib("jvm"),
    }


def main() -> None:
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")  # local mode: the driver on loopback
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides: tracking.uri=..., predict.model=...")
    parser.add_argument("--rows", type=int, default=100_000, help="rows that each engine scores")
    parser.add_argument("--pyfunc-rows", type=int, default=5_000, help="rows that the torch pyfunc scores")
    parser.add_argument("--udf-rows", type=int, default=5_000, help="rows that spark_udf scores")
    parser.add_argument(
        "--agnews",
        type=Path,
        default=Path(os.environ.get("AGNEWS_DIR", PROJECT_ROOT.parent / "shared" / "data" / "ag_news")),
    )
    parser.add_argument("--output", type=Path, default=RESULTS / "predict.json")
    args = parser.parse_args()

    load_before = os.getloadavg()
    settings = compose(args.overrides)
    connect(settings.tracking)
    with tempfile.TemporaryDirectory(prefix="predict-bench-") as tmp:
        folder = Path(tmp)
        source = rows_file(args.agnews, max(args.rows, args.pyfunc_rows, args.udf_rows), folder)
        model = fetch(settings.predict.model, folder / "model")
        uri = f"models:/{model.name}/{model.version}"
        texts = pd.read_parquet(source).text.head(args.pyfunc_rows).tolist()
        engine_source = source
        if args.rows < len(pd.read_parquet(source, columns=["id"])):
            engine_source = folder / "engine.parquet"
            pd.read_parquet(source).head(args.rows).to_parquet(engine_source)
        local = replace(settings.predict, engine="local", workers=0)
        figures = {"local": engine_rate(local, model, engine_source, folder / "local")}
        figures["pyfunc"] = pyfunc_rate(uri, texts)
        session(replace(settings.predict.spark, master="local[1]")).stop()  # the JVM's start, counted by neither
        for cores in (1, 2):
            spark = replace(
                settings.predict,
                engine="spark",
                spark=replace(settings.predict.spark, master=f"local[{cores}]", partitions=cores),
            )
            figures[f"spark_local_{cores}"] = engine_rate(spark, model, engine_source, folder / f"spark{cores}")
        figures["spark_udf_local_2"] = spark_udf_rate(uri, source, args.udf_rows, "local[2]")

    rate = {name: figure["rows_per_s"] for name, figure in figures.items()}
    ratios = {
        "local_vs_pyfunc": round(rate["local"] / rate["pyfunc"], 2),
        "spark_2_vs_1": round(rate["spark_local_2"] / rate["spark_local_1"], 2),
        "spark_bundle_vs_spark_udf": round(rate["spark_local_2"] / rate["spark_udf_local_2"], 2),
    }
    result = {
        "model": {"name": model.name, "version": model.version, "manifest_sha256": model.manifest_sha256},
        "args": {"rows": args.rows, "pyfunc_rows": args.pyfunc_rows, "udf_rows": args.udf_rows},
        "chunk_rows": settings.predict.chunk_rows,
        "figures": figures,
        "ratios": ratios,
        "targets": TARGETS,
        "met": {name: ratios[name] >= goal for name, goal in TARGETS.items()},
        "peak_worker_mib": {
            "local": figures["local"]["peak_worker_mib"],
            "spark_local_2": figures["spark_local_2"]["peak_worker_mib"],
            "spark_udf_local_2": figures["spark_udf_local_2"]["peak_worker_mib"],
        },
        "machine": machine() | {"load_avg_before": list(load_before), "load_avg_after": list(os.getloadavg())},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
