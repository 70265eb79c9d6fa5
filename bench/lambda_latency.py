"""The Lambda against the torch pyfunc, side by side in one run: cold start, warm latency, deployment size.

    python bench/lambda_latency.py tracking.uri=sqlite:///mlflow/mlflow.db [more overrides...]

It serves ``models:/<registry.model_name>@champion``, the model the pipeline promoted (for the issue's targets,
train with ``model=minilm`` first). The mirror step copies that version's bundle into a moto S3 server on
127.0.0.1, from which the handler loads it.

The Lambda side runs the deployment zip (``make lambda-zip``) unpacked, with its own numpy and onnxruntime ahead of
this environment's (boto3, which the runtime ships, comes from here).

- cold start: a fresh process that imports the handler and answers one text, with an empty model cache (so the
  model comes from S3), against a fresh process that loads the pyfunc (from a local copy) and predicts one text;
  the median of ``--cold-runs``, seconds from spawning the process to its first answer (the time to its exit, which
  no request waits for, is kept beside it);
- warm: p50 and p95 over ``--warm-runs`` calls of one text, and of a batch of 32: the pyfunc in this process, the
  Lambda in one process of its own;
- size: the unzipped Lambda zip (``make lambda-zip``) against the installed size of torch and transformers with
  their dependencies, each with its model files.

Figures go to bench/results/lambda.json.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import boto3
import mlflow
import numpy as np
import pandas as pd
from moto.server import ThreadedMotoServer
from packaging.requirements import Requirement
from timing import timings
from train_bench import RESULTS, machine

from agnews.config import AGNEWS_DIR, PROJECT_ROOT, compose
from agnews.data import parse_csv
from agnews.publishing import mirror
from agnews.pyfunc import BUNDLE_PATH
from agnews.registry import CHAMPION
from agnews.tracking import connect
from agnews.training import INPUT_EXAMPLE

LAMBDA_ZIP = PROJECT_ROOT / "build" / "lambda.zip"
BUCKET = "bench-models"
BATCH = 32
TORCH_PACKAGE = ("torch", "transformers")  # what a torch-based Lambda would have to ship
TARGETS = {"warm_p50_speedup": 3.0, "cold_start_speedup": 8.0, "size_ratio": 0.25}
MB = 1e6

LAMBDA_COLD = """
import json, sys, time
start = time.perf_counter()
sys.path[:0] = [sys.argv[1]]
import handler
imported = time.perf_counter()
response = handler.lambda_handler({"text": sys.argv[2]}, None)
assert response["statusCode"] == 200, response
answered = time.perf_counter()
print(json.dumps({"answered_at": time.time(), "import_s": imported - start, "first_answer_s": answered - imported}))
"""

LAMBDA_WARM = """
import json, sys
sys.path[:0] = sys.argv[1:3]
import handler
from timing import timings
pool, sizes = json.load(sys.stdin)

def call(batch):
    response = handler.lambda_handler({"texts": batch}, None)
    assert response["statusCode"] == 200, response

print(json.dumps({name: timings(call, pool, size, runs) for name, (size, runs) in sizes.items()}))
"""

PYFUNC_COLD = """
import json, sys, time
start = time.perf_counter()
import mlflow, pandas as pd
imported = time.perf_counter()
model = mlflow.pyfunc.load_model(sys.argv[1])
loaded = time.perf_counter()
model.predict(pd.DataFrame({"text": [sys.argv[2]]}))
answered = time.perf_counter()
print(json.dumps({
    "answered_at": time.time(),
    "import_s": imported - start,
    "load_s": loaded - imported,
    "first_answer_s": answered - loaded,
}))
"""


def texts() -> list[str]:
    """AG News test texts where the local copy is present, else the train step's input example."""
    path = AGNEWS_DIR / "test.csv"
    return parse_csv(path, n_labels=4).text.tolist() if path.is_file() else list(INPUT_EXAMPLE)


def folder_size(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def installed_size(roots: tuple[str, ...]) -> tuple[int, list[str]]:
    """Bytes on disk of ``roots`` and everything they require (extras left out), as installed here."""
    seen: dict[str, int] = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            continue
        key = dist.metadata["Name"].lower().replace("_", "-")
        if key in seen:
            continue
        files = [f for f in dist.files or [] if f.parts[0] != ".."]
        seen[key] = sum(Path(dist.locate_file(f)).stat().st_size for f in files if Path(dist.locate_file(f)).is_file())
        for line in dist.requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return sum(seen.values()), sorted(seen)


def lambda_package(folder: Path) -> int:
    """Build (or find up to date) the deployment zip with ``make lambda-zip``, unpack it into ``folder``, and return
    its unzipped bytes."""
    subprocess.run(
        ["make", "-o", ".venv/.installed", "lambda-zip", f"PY={sys.executable}"], cwd=PROJECT_ROOT, check=True
    )
    with zipfile.ZipFile(LAMBDA_ZIP) as archive:
        archive.extractall(folder)
        return sum(info.file_size for info in archive.infolist())


def cold_starts(code: str, args: list[str], env: dict[str, str], runs: int) -> dict:
    """Median seconds from spawning a fresh process to its first answer, over ``runs`` processes; with the time
    to the process's exit, and the phases the last one reported."""
    answers, exits, phases = [], [], {}
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as cache:
            spawned, started = time.time(), time.perf_counter()
            done = subprocess.run(
                [sys.executable, "-c", code, *args],
                env=env | {"MODEL_CACHE_DIR": cache},
                capture_output=True,
                text=True,
                check=True,
            )
            exits.append(time.perf_counter() - started)
        phases = json.loads(done.stdout.splitlines()[-1])
        answers.append(phases.pop("answered_at") - spawned)
    return {"median_s": statistics.median(answers), "runs_s": answers, "to_exit_s": exits, "phases_s": phases}


def summary(times: list[float]) -> dict:
    return {"p50_ms": float(np.percentile(times, 50)), "p95_ms": float(np.percentile(times, 95)), "runs": len(times)}


def lambda_warm(package: Path, env: dict[str, str], pool: list[str], sizes: dict[str, tuple[int, int]]) -> dict:
    """Warm latencies of the packaged handler, in a process of its own."""
    done = subprocess.run(
        [sys.executable, "-c", LAMBDA_WARM, str(package), str(Path(__file__).parent)],
        input=json.dumps([pool, sizes]),
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return {name: summary(times) for name, times in json.loads(done.stdout.splitlines()[-1]).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides: tracking.uri=..., registry.model_name=...")
    parser.add_argument("--cold-runs", type=int, default=5)
    parser.add_argument("--warm-runs", type=int, default=200)
    parser.add_argument("--batch-runs", type=int, default=40)
    args = parser.parse_args()

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    s3_env = {
        "S3_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_REGION": "us-east-1",
    }
    os.environ.update(s3_env)
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
    cfg = compose([*args.overrides, f"storage.uri=s3://{BUCKET}"])
    connect(cfg)
    mirrored = mirror(cfg)
    model_root = f"s3://{BUCKET}/{cfg.storage.model_prefix}/{cfg.registry.model_name}"
    lambda_env = os.environ | s3_env | {"MODEL_URI": model_root}
    pool = texts()

    sizes = {"one_text": (1, args.warm_runs), f"batch_{BATCH}": (BATCH, args.batch_runs)}
    with tempfile.TemporaryDirectory() as tmp:
        package = Path(tmp) / "package"
        package_bytes = lambda_package(package)
        pyfunc_dir = mlflow.artifacts.download_artifacts(f"models:/{cfg.registry.model_name}@{CHAMPION}", dst_path=tmp)
        cold = {
            "lambda": cold_starts(LAMBDA_COLD, [str(package), pool[0]], lambda_env, args.cold_runs),
            "pyfunc": cold_starts(PYFUNC_COLD, [pyfunc_dir, pool[0]], dict(os.environ), args.cold_runs),
        }
        pyfunc = mlflow.pyfunc.load_model(pyfunc_dir)

        def pyfunc_call(batch: list[str]) -> object:
            return pyfunc.predict(pd.DataFrame({"text": batch}))

        latency = {
            "lambda": lambda_warm(package, lambda_env | {"MODEL_CACHE_DIR": str(Path(tmp) / "cache")}, pool, sizes),
            "pyfunc": {name: summary(timings(pyfunc_call, pool, *size)) for name, size in sizes.items()},
        }
        torch_model = folder_size(Path(pyfunc_dir) / "artifacts" / "model")
        bundle = folder_size(Path(pyfunc_dir) / BUNDLE_PATH)

    torch_package, torch_dists = installed_size(TORCH_PACKAGE)
    size = {
        "lambda_package_mb": package_bytes / MB,
        "lambda_model_mb": bundle / MB,
        "torch_package_mb": torch_package / MB,
        "torch_model_mb": torch_model / MB,
        "torch_package_distributions": torch_dists,
    }
    ratios = {
        "warm_p50_speedup_one_text": latency["pyfunc"]["one_text"]["p50_ms"] / latency["lambda"]["one_text"]["p50_ms"],
        f"warm_p50_speedup_batch_{BATCH}": latency["pyfunc"][f"batch_{BATCH}"]["p50_ms"]
        / latency["lambda"][f"batch_{BATCH}"]["p50_ms"],
        "cold_start_speedup": cold["pyfunc"]["median_s"] / cold["lambda"]["median_s"],
        "size_ratio": (size["lambda_package_mb"] + size["lambda_model_mb"])
        / (size["torch_package_mb"] + size["torch_model_mb"]),
    }
    result = {
        "model": f"models:/{cfg.registry.model_name}/{mirrored.version}",
        "cold_start": cold,
        "warm": latency,
        "size": size,
        "ratios": ratios,
        "targets": TARGETS,
        "targets_met": {
            "warm_p50": min(ratios["warm_p50_speedup_one_text"], ratios[f"warm_p50_speedup_batch_{BATCH}"])
            >= TARGETS["warm_p50_speedup"],
            "cold_start": ratios["cold_start_speedup"] >= TARGETS["cold_start_speedup"],
            "size": ratios["size_ratio"] <= TARGETS["size_ratio"],
        },
        "command": " ".join(["python bench/lambda_latency.py", *sys.argv[1:]]),
        "machine": machine(),
    }
    server.stop()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "lambda.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
