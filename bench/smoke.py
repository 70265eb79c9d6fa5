"""The smoke run's time and accuracy: `make smoke` from a fresh store and tracking database, timed end to end.

    python bench/smoke.py

It runs the pipeline on conf/preset/smoke.yaml with the local AG News copy (AGNEWS_DIR), then the Lambda handler
on the seed's example, exactly as `make smoke` does, and writes bench/results/smoke.json: wall seconds, the load
average before and after, the model's test accuracy and the handler's answer. Run it alone on the machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from mlflow import MlflowClient
from train_bench import AGNEWS_DIR, RESULTS, machine

from agnews import names
from agnews.config import PROJECT_ROOT, compose


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            f"data.source={AGNEWS_DIR}",
            f"storage.uri={tmp}/store",
            f"tracking.uri=sqlite:///{tmp}/mlflow.db",
            f"train.output_dir={tmp}/checkpoints",
        ]
        load_before = os.getloadavg()[0]
        started = time.perf_counter()
        done = subprocess.run(
            ["make", "--no-print-directory", "smoke", f"ARGS={' '.join(args)}"],
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
        )
        seconds = time.perf_counter() - started
        load_after = os.getloadavg()[0]
        if done.returncode:
            sys.exit(f"make smoke failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        lines = done.stdout.splitlines()
        answer = json.loads("\n".join(lines[max(i for i, line in enumerate(lines) if line == "{") :]))
        cfg = compose(["preset=smoke", *args])
        client = MlflowClient(cfg.tracking.uri)
        experiment = client.get_experiment_by_name(cfg.tracking.experiment)
        (run,) = client.search_runs([experiment.experiment_id], "tags.step = 'train'")
    result = {
        "command": "python bench/smoke.py",
        "make_smoke_seconds": seconds,
        "load_avg_1m_before": load_before,
        "load_avg_1m_after": load_after,
        names.TEST_ACCURACY: run.data.metrics[names.TEST_ACCURACY],
        names.TEST_ROWS: run.data.metrics[names.TEST_ROWS],
        names.BEHAVIOUR_PASS_RATE: run.data.metrics[names.BEHAVIOUR_PASS_RATE],
        "lambda_answer": answer,
        "machine": machine(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "smoke.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
