"""onnxruntime's thread pool is sized from the CPUs the process may use (its affinity and its cgroup's CPU quota), not
from the host's cores, and its threads spin only when they have CPUs of their own."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from bundle.predictor import SPINNING, Predictor, cpu_quota, session_options, usable_cpus


@pytest.mark.parametrize(
    ("cpu_max", "quota"),
    [("max 100000\n", None), ("50000 100000\n", 0.5), ("200000 100000", 2.0), (None, None), ("", None)],
)
def test_cpu_quota_reads_cgroup_v2_cpu_max(cpu_max: str | None, quota: float | None) -> None:
    assert cpu_quota(cpu_max) == quota


@pytest.mark.parametrize(
    ("affinity", "quota", "cpus"),
    [(8, None, 8), (1, None, 1), (8, 0.5, 1), (8, 1.0, 1), (8, 1.9, 1), (8, 2.0, 2), (2, 6.0, 2)],
)
def test_usable_cpus_is_the_affinity_capped_by_the_quotas_whole_cpus(
    affinity: int, quota: float | None, cpus: int
) -> None:
    assert usable_cpus(affinity, quota) == cpus


@pytest.mark.parametrize(
    ("affinity", "cpu_max", "threads", "spinning"),
    [
        (1, "max 100000", 1, "0"),  # Lambda below 1,769 MB, or taskset -c 0: one CPU, nothing to spin on
        (16, "100000 100000", 1, "0"),  # a host's 16 cores under a one-CPU quota
        (16, "400000 100000", 4, "0"),  # four CPUs' worth of time, shared: a spinning thread spends the quota
        (4, "max 100000", 4, "1"),  # four CPUs of its own
        (4, None, 4, "1"),  # no cgroup v2 file
    ],
)
def test_session_options_follow_the_cpus_the_process_may_use(
    affinity: int, cpu_max: str | None, threads: int, spinning: str
) -> None:
    options = session_options(affinity, cpu_max)
    assert options.intra_op_num_threads == threads
    assert options.inter_op_num_threads == 1
    assert options.get_session_config_entry(SPINNING) == spinning


@pytest.fixture
def one_cpu() -> Iterator[int]:
    """This thread pinned to one of its CPUs, as `taskset -c` or a one-vCPU Lambda would run it."""
    before = os.sched_getaffinity(0)
    cpu = min(before)
    os.sched_setaffinity(0, {cpu})
    try:
        yield cpu
    finally:
        os.sched_setaffinity(0, before)


def test_a_predictor_pinned_to_one_cpu_runs_one_thread_that_does_not_spin(tiny_bundle: Path, one_cpu: int) -> None:
    options = Predictor(tiny_bundle).session.get_session_options()
    assert options.intra_op_num_threads == 1
    assert options.get_session_config_entry(SPINNING) == "0"
    given = Predictor(tiny_bundle, session_options(2, "max 100000"))  # options passed in are the ones used
    assert given.session.get_session_options().intra_op_num_threads == 2
