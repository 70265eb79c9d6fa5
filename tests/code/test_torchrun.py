"""Scale-out: the train step under `torchrun --nproc_per_node 2` on CPU (gloo DDP), with the tiny model."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from agnews.config import PROJECT_ROOT
from agnews.upload import upload

PROCESSES = 2
SAMPLE_SIZE = 200
TIMEOUT_S = 600


@pytest.mark.slow
def test_torchrun_two_cpu_processes(make_cfg, agnews_dir: Path, mlflow_db: Path) -> None:
    """Each rank trains on half the rows (so half the optimizer steps); only rank 0 logs, into one run."""
    overrides = [
        "preset=test",
        f"data.source={agnews_dir}",
        f"data.sample_size={SAMPLE_SIZE}",
        f"data.val_size={SAMPLE_SIZE}",
        f"data.test_size={SAMPLE_SIZE}",
    ]
    cfg = make_cfg(*overrides)
    upload(cfg.data, cfg.storage)
    database = Path(cfg.tracking.uri.removeprefix("sqlite:///"))
    database.parent.mkdir(parents=True)
    shutil.copy(mlflow_db, database)
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "S3_BUCKET")}
    env["ACCELERATE_USE_CPU"] = "true"  # as `accelerate launch --cpu` sets it: without it, no DDP on a CPU-only host
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={PROCESSES}"),
        *("-m", "steps.train", *overrides),
        *(f"storage.uri={cfg.storage.uri}", f"tracking.uri={cfg.tracking.uri}"),
        f"train.output_dir={cfg.train.output_dir}",
    ]
    done = subprocess.run(
        command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False
    )
    assert done.returncode == 0, done.stderr[-5000:]

    client = MlflowClient(cfg.tracking.uri)
    runs = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
    assert len(runs) == 1, [(r.info.run_id, sorted(r.data.metrics)) for r in runs]
    (run,) = runs
    assert (run.info.status, run.data.tags["step"]) == ("FINISHED", "train")
    assert run.data.metrics["test_rows"] == SAMPLE_SIZE
    assert {"test_accuracy", "test_f1_macro", "onnx_int8_accuracy", "behaviour_pass_rate"} <= set(run.data.metrics)
    (final,) = client.get_metric_history(run.info.run_id, "train_runtime")
    assert final.step == math.ceil(SAMPLE_SIZE / PROCESSES / cfg.train.batch_size)
