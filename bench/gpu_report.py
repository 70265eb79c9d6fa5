"""The Python half of bench/gpu_check.sh: the machine's facts before the runs, and the report after them.

    python bench/gpu_report.py env OUT.json
    python bench/gpu_report.py summary WORK RESULT.json

``env`` records the card, driver, CUDA, package versions, and what the train config resolves to on this device.
``summary`` reads each step's train run from the check's MLflow store (``WORK/mlflow.db``, one experiment per step,
``gpu-<step>``) with the exit status and wall time the script kept in ``WORK/steps.tsv``, and writes the figures
that docs/benchmarks.md reports, with every step's record, to RESULT.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
from dataclasses import asdict
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from agnews import names
from agnews.config import compose
from agnews.precision import detect, for_config

PACKAGES = ("accelerate", "tokenizers", "datasets", "numpy", "onnx", "onnxruntime", "mlflow", "mlflow-skinny")
METRICS = (
    names.TRAIN_LOOP_SAMPLES_PER_SECOND,
    names.TRAIN_SAMPLES_PER_SECOND,
    names.TRAIN_WALL_TIME_S,
    "train_loss",
    names.BEST_VAL_ACCURACY,
    names.TEST_ACCURACY,
    names.TEST_F1_MACRO,
    names.ONNX_INT8_ACCURACY,
    names.ONNX_INT8_AGREEMENT,
    names.PEAK_RSS_MB,
    names.TRAIN_ROWS,
    names.VAL_ROWS,
    names.TEST_ROWS,
)
PARAMS = (
    "train.precision",
    "train.tf32",
    "train.pad_to_multiple_of",
    "train.dataloader_workers",
    "train.batch_size",
    "train.max_length",
    "train.pad_to_max_length",
    "train.group_by_length",
    "train.learning_rate",
    "train.epochs",
    "data.sample_size",
    "data.val_size",
    "data.test_size",
    "model.init.dim",
    "model.init.hidden_dim",
    "model.init.n_layers",
    "model.init.n_heads",
)
SETTINGS = ("BUDGET", "SAMPLE", "TEST_ROWS", "DIMS", "LR", "FULL_SAMPLE", "EPOCHS", "EXTRA", "STEPS", "AGNEWS_DIR")
TARGETS = {"ours_over_seed": 10.0, "auto_over_fp32": 1.5, "full_train_loop_s": 20.0, names.ONNX_INT8_AGREEMENT: 0.98}


def installed(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def nvidia_smi(*fields: str) -> list[str] | None:
    """One row of ``nvidia-smi --query-gpu`` for GPU 0, or None without nvidia-smi."""
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits", "--id=0"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return [value.strip() for value in out.strip().split(",")]


def env(out: Path) -> dict:
    import torch

    device = detect()
    smi = nvidia_smi("name", "driver_version", "memory.total", "power.limit")
    resolved = {
        name: {
            names.PRECISION_TAG: r.precision,
            "pad_to_multiple_of": r.pad_to_multiple_of,
            "trainer_kwargs": r.trainer_kwargs,
        }
        for name, r in (
            ("default", for_config(compose([]).train, device)),
            ("seed_recipe", for_config(compose(["train=seed_recipe"]).train, device)),
        )
    }
    info = {
        "card": device.name if device.cuda else None,
        names.DEVICE_TAG: asdict(device),
        "driver": smi[1] if smi else None,
        "gpu_memory_mib": smi[2] if smi else None,
        "power_limit_w": smi[3] if smi else None,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "transformers": installed("transformers"),
        "packages": {name: installed(name) for name in PACKAGES},
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "resolved": resolved,
    }
    out.write_text(json.dumps(info, indent=2) + "\n")
    return info


def step_records(work: Path) -> dict[str, dict]:
    """What the script kept for each step: exit status, wall seconds, time limit and arguments, or why it skipped."""
    records: dict[str, dict] = {}
    path = work / "steps.tsv"
    rows = csv.reader(path.read_text().splitlines(), delimiter="\t") if path.is_file() else []
    for label, rc, wall, limit, note, arguments in rows:
        record: dict = {"arguments": arguments}
        if note:
            record["skipped"] = note
        else:
            record |= {"rc": int(rc), "wall_s": float(wall), "limit_s": int(limit), "timed_out": int(rc) in (124, 137)}
        records[label] = record
    return records


def gpu_utilisation(work: Path, label: str) -> float | None:
    """Mean GPU utilisation (%) while the step ran, from the nvidia-smi samples the script took, if any."""
    path = work / "smi" / f"{label}.csv"
    values = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            values.append(float(line.split(",")[0]))
        except ValueError:
            continue
    return sum(values) / len(values) if values else None


def run_record(client, label: str) -> dict:
    """The step's train run: status, tags, the metrics and params that matter here, and the logged model's files."""
    experiment = client.get_experiment_by_name(f"gpu-{label}")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"]) if experiment else []
    if not runs:
        return {"error": "no train run"}
    run = runs[0]
    record = {
        "run_id": run.info.run_id,
        "status": run.info.status,
        names.PRECISION_TAG: run.data.tags.get(names.PRECISION_TAG),
        names.DEVICE_TAG: run.data.tags.get(names.DEVICE_TAG),
        "metrics": {key: run.data.metrics[key] for key in METRICS if key in run.data.metrics},
        "params": {key: run.data.params.get(key) for key in PARAMS},
        "pyfunc_logged": False,
        "int8_bundle_logged": False,
    }
    models = client.search_logged_models(
        [experiment.experiment_id], filter_string=f"source_run_id = '{run.info.run_id}'"
    )
    for model in models:
        files = {a.path for a in client.list_logged_model_artifacts(model.model_id)}
        serving = {a.path for a in client.list_logged_model_artifacts(model.model_id, "artifacts/serving")}
        record["pyfunc_logged"] |= "MLmodel" in files
        record["int8_bundle_logged"] |= "artifacts/serving/model.int8.onnx" in serving
    return record


def loop_seconds(step: dict) -> float | None:
    """Seconds inside the training loop: the samples trained over the samples per second of the loop."""
    m, p = step.get("metrics", {}), step.get("params", {})
    if not m.get(names.TRAIN_LOOP_SAMPLES_PER_SECOND) or names.TRAIN_ROWS not in m or p.get("train.epochs") is None:
        return None
    return m[names.TRAIN_ROWS] * float(p["train.epochs"]) / m[names.TRAIN_LOOP_SAMPLES_PER_SECOND]


def ratio(steps: dict, numerator: str, denominator: str, key: str = names.TRAIN_LOOP_SAMPLES_PER_SECOND) -> dict:
    a = steps.get(numerator, {}).get("metrics", {}).get(key)
    b = steps.get(denominator, {}).get("metrics", {}).get(key)
    return {numerator: a, denominator: b, "ratio": a / b if a and b else None}


def summary(work: Path, result: Path) -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    steps = step_records(work)
    for label, step in steps.items():
        if label in ("env", "upload") or "skipped" in step:
            continue
        step |= run_record(client, label)
        step["gpu_utilisation_mean_pct"] = gpu_utilisation(work, label)
        step["train_loop_seconds"] = loop_seconds(step)
        if step.get("status") != "FINISHED" and (log := work / "logs" / f"{label}.log").is_file():
            step["log_tail"] = log.read_text(errors="replace")[-3000:]
    env_file = work / "env.json"
    full = steps.get("full", {})
    report = {
        "command": "bench/gpu_check.sh",
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "settings": {name: os.environ.get(name) for name in SETTINGS},
        "machine": json.loads(env_file.read_text()) if env_file.is_file() else None,
        "ours_over_seed": ratio(steps, "ours", "seed") | {"target": TARGETS["ours_over_seed"]},
        "auto_over_fp32": ratio(steps, "ours", "ours_fp32")
        | {
            "auto_resolved_to": steps.get("ours", {}).get(names.PRECISION_TAG),
            names.BEST_VAL_ACCURACY: {
                label: steps.get(label, {}).get("metrics", {}).get(names.BEST_VAL_ACCURACY)
                for label in ("ours", "ours_fp32")
            },
            "target": TARGETS["auto_over_fp32"],
        },
        "full": {
            "status": full.get("status"),
            names.PRECISION_TAG: full.get(names.PRECISION_TAG),
            names.TRAIN_ROWS: full.get("metrics", {}).get(names.TRAIN_ROWS),
            "epochs": int(full["params"]["train.epochs"]) if full.get("params") else None,
            "train_loop_seconds": full.get("train_loop_seconds"),
            names.TEST_ACCURACY: full.get("metrics", {}).get(names.TEST_ACCURACY),
            names.ONNX_INT8_AGREEMENT: full.get("metrics", {}).get(names.ONNX_INT8_AGREEMENT),
            "pyfunc_logged": full.get("pyfunc_logged"),
            "int8_bundle_logged": full.get("int8_bundle_logged"),
            "targets": {"train_loop_seconds": TARGETS["full_train_loop_s"], names.ONNX_INT8_AGREEMENT: 0.98},
        },
        "diagnostics": {
            "padded_to_multiple_over_unpadded": ratio(steps, "ours", "ours_no_pad"),
            "tf32_over_fp32": ratio(steps, "ours_tf32", "ours_fp32"),
        },
        "steps": steps,
    }
    result.parent.mkdir(parents=True, exist_ok=True)
    result.write_text(json.dumps(report, indent=2) + "\n")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("env").add_argument("out", type=Path)
    summarize = commands.add_parser("summary")
    summarize.add_argument("work", type=Path)
    summarize.add_argument("result", type=Path)
    args = parser.parse_args()
    if args.command == "env":
        print(json.dumps(env(args.out)))
        return
    report = summary(args.work, args.result)
    headline = {key: report[key] for key in ("ours_over_seed", "auto_over_fp32", "full", "diagnostics")}
    print(json.dumps(headline, indent=2))
    failed = [label for label, step in report["steps"].items() if step.get("rc") not in (None, 0)]
    if failed:
        print(f"steps that failed: {', '.join(failed)}", file=sys.stderr)


if __name__ == "__main__":
    main()
