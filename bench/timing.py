"""Warm-latency timing for bench/lambda_latency.py, in the standard library alone: the process that runs the
unpacked Lambda zip (with its own numpy and onnxruntime) imports it too."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator


def timings(call: Callable[[list[str]], object], pool: list[str], size: int, runs: int) -> list[float]:
    """Milliseconds of ``runs`` calls of ``call`` on ``size`` texts at a time from ``pool``, after one warm-up call."""
    call(pool[:size])
    times = []
    for i in range(runs):
        start = (i * size) % (len(pool) - size + 1)
        began = time.perf_counter()
        call(pool[start : start + size])
        times.append(1000 * (time.perf_counter() - began))
    return times


@contextlib.contextmanager
def on_cpu(cpu: int) -> Iterator[None]:
    """This process on ``cpu`` alone for the block (a Predictor made inside sizes its onnxruntime pool to it)."""
    allowed = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, allowed)
