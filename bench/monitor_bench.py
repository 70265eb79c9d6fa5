"""The monitor step on a busy day: a million captured answers in one run, its time, rows per second and peak RSS.

    python bench/monitor_bench.py [--answers 1000000] [--output bench/results/monitor.json]

It writes a day of capture lines as the Lambda writes them (lambda/handler.py's ``request_lines``, one text a
request, the worst case for lines per answer) into a local store, laid out as Firehose delivers them (an object
every five minutes in the hour partitions of bundle/capture.py), with labels for a tenth of the texts; registers a
version whose reference profile is drawn from the same distribution in a SQLite tracking store; and then runs
``python -m steps.monitor`` on that day in a process of its own, timing it and reading its peak RSS from the kernel
(``wait4``). The issue's bound is a peak RSS of 1 GiB for 1,000,000 answers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
from machine import machine
from mlflow import MlflowClient
from train_bench import RESULTS

from agnews.config import PROJECT_ROOT
from agnews.monitoring import reference
from agnews.names import REFERENCE_ARTIFACT, TEST_ACCURACY
from bundle.capture import entry, object_prefix, text_sha256

sys.path.insert(0, str(PROJECT_ROOT / "lambda"))
import handler  # lambda/ is no package: its modules import each other by bare name
from model_store import LoadedModel

MODEL = "bench-agnews"
LABELS = ("World", "Sports", "Business", "Sci/Tech")
DAY = datetime(2026, 12, 1, tzinfo=UTC)
OBJECT_EVERY = timedelta(minutes=5)  # Firehose's buffering interval, at most 900 s
REFERENCE_ROWS = 2000  # the validation split's size (conf/data/ag_news.yaml)
LABELLED_SHARE = 0.1
GIB = 1024**3


def answers(rng: np.random.Generator, count: int) -> pd.DataFrame:
    """``count`` answers of a model on AG News-like traffic: confident probabilities, about 53 tokens, 1% cut."""
    probabilities = rng.dirichlet([0.3] * len(LABELS), count)
    tokens = np.clip(rng.normal(53, 15, count).round(), 5, 126).astype(int)
    return pd.DataFrame(
        {
            "probabilities": list(probabilities),
            "tokens": tokens,
            "cut": rng.random(count) < 0.01,
            "text": [f"bench text {uuid.UUID(int=int(n)).hex}" for n in rng.integers(0, 2**62, count)],
        }
    )


def write_captures(root: Path, count: int, rng: np.random.Generator) -> list[tuple[str, str]]:
    """A day of ``count`` one-text capture lines in ``root``'s captures/ prefix; returns (text sha256, label) for a
    tenth of them."""
    model = LoadedModel(MODEL, 1, "0" * 64, None, None, {})  # type: ignore[arg-type]  (no predictor: lines only)
    objects = int(timedelta(days=1) / OBJECT_EVERY)
    per_object = -(-count // objects)
    labels: list[tuple[str, str]] = []
    written = 0
    for number in range(objects):
        batch = answers(rng, min(per_object, count - written))
        if batch.empty:
            break
        when = DAY + number * OBJECT_EVERY
        lines = []
        start_ms = int(when.timestamp() * 1000)
        step_ms = OBJECT_EVERY / timedelta(milliseconds=1) / len(batch)
        rows = zip(batch.probabilities, batch.tokens, batch.cut, batch.text, strict=True)
        for i, (probabilities, tokens, cut, text) in enumerate(rows):
            best = LABELS[int(np.argmax(probabilities))]
            result = {"predicted_class": best, "probabilities": dict(zip(LABELS, probabilities, strict=True))}
            outcome = handler.Outcome(model=model, texts=1, predicted=Counter([best]))
            outcome.captures = [entry(result, int(tokens), bool(cut), text, keep_text=False)]
            stamp = start_ms + int(i * step_ms)
            lines.append(handler.request_lines(200, 4.2, outcome, str(uuid.uuid4()), stamp)[0])
            if rng.random() < LABELLED_SHARE:  # nine labels in ten agree with the answer
                labels.append((text_sha256(text), best if rng.random() < 0.9 else LABELS[0]))
        path = root / object_prefix(MODEL, when) / f"bench-1-{when:%Y-%m-%d-%H-%M-%S}-{uuid.uuid4()}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n")
        written += len(batch)
    return labels


def register_version(tracking_uri: str, workdir: Path, rng: np.random.Generator) -> None:
    """Version 1 of MODEL, its run holding a reference profile from the same distribution and a test accuracy."""
    client = MlflowClient(tracking_uri)
    experiment = client.create_experiment("bench", artifact_location=(workdir / "artifacts").as_uri())
    run = client.create_run(experiment).info.run_id
    drawn = answers(rng, REFERENCE_ROWS)
    probabilities = np.stack(drawn.probabilities.to_numpy())
    frame = pd.DataFrame(
        {
            reference.PREDICTED: [LABELS[i] for i in probabilities.argmax(1)],
            reference.CONFIDENCE: probabilities.max(1),
            reference.TOKENS: drawn.tokens,
            reference.CUT: drawn.cut,
            reference.TEXT: drawn.text,
        }
    )
    path = reference.write(frame, workdir / "reference" / Path(REFERENCE_ARTIFACT).name)
    client.log_artifact(run, str(path), str(Path(REFERENCE_ARTIFACT).parent))
    client.log_metric(run, TEST_ACCURACY, 0.9)
    client.set_terminated(run)
    client.create_registered_model(MODEL)
    client.create_model_version(MODEL, f"runs:/{run}/model", run_id=run)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--answers", type=int, default=1_000_000)
    parser.add_argument("--output", type=Path, default=RESULTS / "monitor.json")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="monitor-bench-") as tmp:
        workdir = Path(tmp)
        tracking = f"sqlite:///{workdir / 'mlflow.db'}"
        started = time.perf_counter()
        labels = write_captures(workdir / "store", args.answers, rng)
        pd.DataFrame(labels, columns=["text_sha256", "label"]).to_csv(workdir / "labels.csv", index=False)
        register_version(tracking, workdir, rng)
        generated_s = time.perf_counter() - started
        command = [
            sys.executable,
            "-m",
            "steps.monitor",
            f"tracking.uri={tracking}",
            f"storage.uri={workdir / 'store'}",
            f"registry.model_name={MODEL}",
            f"monitor.since={DAY.isoformat()}",
            f"monitor.until={(DAY + timedelta(days=1)).isoformat()}",
            f"monitor.labels={workdir / 'labels.csv'}",
            "monitor.fail_on=never",
        ]
        env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "S3_BUCKET", "MLFLOW_RUN_ID")}
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, text=True)
        out = process.stdout.read() if process.stdout else ""
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"error: the monitor step failed:\n{out}")
    peak = usage.ru_maxrss * 1024  # kilobytes on Linux
    result = {
        "command": f"python bench/monitor_bench.py --answers {args.answers}",
        "answers": args.answers,
        "labelled": len(labels),
        "generate_s": round(generated_s, 1),
        "monitor_s": round(seconds, 1),
        "rows_per_s": round(args.answers / seconds),
        "peak_rss_mib": round(peak / 2**20, 1),
        "within_1_gib": peak <= GIB,
        "line": next((line for line in out.splitlines() if line.startswith("monitor: ") and "MLflow" not in line), ""),
        "machine": machine(),
    }
    print(json.dumps(result, indent=2))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
