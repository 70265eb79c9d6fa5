"""Warm-latency timing for bench/lambda_latency.py, in the standard library alone: the process that runs the
unpacked Lambda zip (with its own numpy and onnxruntime) imports it too."""

from __future__ import annotations

import time
from collections.abc import Callable


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
