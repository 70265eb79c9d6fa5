"""The local engine: a process per usable CPU scores the input chunk by chunk, and one parquet file takes the chunks
in the input's order. At most two chunks per process are in flight, so memory follows ``predict.chunk_rows``."""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from agnews.scoring.output import SUCCESS
from agnews.scoring.rows import Counts, Model, prediction_fields, scored
from agnews.scoring.source import Location, Source
from agnews.settings import PredictSettings
from bundle.predictor import CPU_MAX, cpu_quota, usable_cpus

PART = "part-00000.parquet"
IN_FLIGHT_PER_WORKER = 2


def workers(settings: PredictSettings) -> int:
    """``predict.workers``, or with 0 the CPUs this process may use (its affinity, within its cgroup's quota)."""
    if settings.workers:
        return settings.workers
    try:
        cpu_max = CPU_MAX.read_text()
    except OSError:
        cpu_max = None
    return usable_cpus(len(os.sched_getaffinity(0)), cpu_quota(cpu_max))


def score_locally(settings: PredictSettings, source: Source, model: Model, staging: Location) -> Counts:
    """Score every row of ``source`` into ``staging`` (a parquet dataset of one file and ``_SUCCESS``)."""
    keep = list(settings.keep_columns)
    read = list(dict.fromkeys([*keep, settings.text_column]))
    schema = pa.schema([*(source.schema.field(name) for name in keep), *prediction_fields(model)])
    processes = workers(settings)
    counts = Counts()
    staging.fs.create_dir(staging.path, recursive=True)
    context = multiprocessing.get_context("spawn")  # no fork of a process that holds MLflow's threads
    with (
        ProcessPoolExecutor(processes, mp_context=context) as pool,
        pq.ParquetWriter(staging.child(PART).path, schema, filesystem=staging.fs) as writer,
        tqdm(total=source.rows(), unit="rows", disable=not settings.progress, desc="predict") as bar,
    ):
        pending: deque[Future[pd.DataFrame]] = deque()

        def write_oldest() -> None:
            frame = pending.popleft().result()
            writer.write_table(pa.Table.from_pandas(frame, schema=schema, preserve_index=False))
            counts.add(frame)
            bar.update(len(frame))

        for frame in source.frames(read, settings.chunk_rows):
            pending.append(pool.submit(scored, frame, model, settings.text_column, keep, settings.max_chars))
            if len(pending) >= IN_FLIGHT_PER_WORKER * processes:
                write_oldest()
        while pending:
            write_oldest()
    with staging.fs.open_output_stream(staging.child(SUCCESS).path):
        pass
    return counts
