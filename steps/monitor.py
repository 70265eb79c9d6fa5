"""The `monitor` step: the served versions' captured answers of a window against each version's reference and, with
labels, its test accuracy, in one MLflow run (docs/monitoring.md).

    python -m steps.monitor [monitor.window=24h | monitor.since=... monitor.until=...] [monitor.labels=...]

It prints one line: the verdict and what was done. With ``monitor.fail_on=drift`` (the default) a ``drift`` verdict
ends it with exit status 3 (``DRIFT_STATUS``), for a scheduler to alarm on; every other verdict with 0.
``monitor.on_drift=retrain`` runs the `main` pipeline as a child run on drift; its model still goes through the gate.
During a rollout the line also gives the candidate's verdict (promote, abort or wait) and why;
``monitor.rollout.act=true`` carries it out.
"""

from __future__ import annotations

import sys

import mlflow

from agnews.config import entrypoint
from agnews.monitoring.watch import watch
from agnews.names import DRIFT, MONITOR_VERDICT_TAG
from agnews.settings import Settings
from agnews.tracking import step_run

DRIFT_STATUS = 3  # not 1, which every step's user errors end with


@entrypoint
def main(cfg: Settings) -> None:
    with step_run(cfg, "monitor") as run:
        outcome = watch(cfg.monitor, cfg.storage, cfg.registry, cfg.seed)
        done = f"tagged run {run.info.run_id} {MONITOR_VERDICT_TAG}={outcome.verdict}"
        if outcome.verdict == DRIFT and cfg.monitor.on_drift == "retrain":
            from agnews.pipeline import pipeline  # torch and transformers, only to retrain

            verdict = pipeline(cfg, nested=True)
            done += f"; retrained: the main run registered v{verdict.version} as @{verdict.alias} ({verdict.reason})"
            mlflow.set_tags({f"monitor.retrained.{key}": value for key, value in verdict.tags().items()})
    print(f"monitor: {outcome.line()}; {done}", flush=True)
    if outcome.verdict == DRIFT and cfg.monitor.fail_on == "drift":
        sys.exit(DRIFT_STATUS)


if __name__ == "__main__":
    main()
