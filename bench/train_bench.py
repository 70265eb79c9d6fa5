"""Training benchmarks on the real AG News copy, through the train step itself.

    python bench/train_bench.py throughput [overrides...]   # seed recipe vs ours, same data and sample count
    python bench/train_bench.py accuracy [overrides...]     # minilm, 5,000 samples, 3 epochs, full test split

Each run uploads AG News (AGNEWS_DIR, default ../shared/data/ag_news) into a store and tracking database under
a temporary folder (or ``--workdir DIR``, kept afterwards, e.g. to register the model and run
bench/lambda_latency.py on it), trains, and writes its figures to bench/results/train_<name>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch

from agnews.config import AGNEWS_DIR, PROJECT_ROOT, compose
from agnews.ingest import upload
from agnews.tracking import step_run
from agnews.training import train

RESULTS = PROJECT_ROOT / "bench" / "results"

# The benchmark settings: the protocol, written once here.
# Our recipe for MiniLM: the default train group (batch 32, dynamic padding, length grouping) with a step size
# suited to a small model and a batch 4x the seed's, and label smoothing.
RECIPE = ["train.learning_rate=8e-5", "train.warmup_ratio=0.1", "train.label_smoothing=0.1"]
THROUGHPUT = ["model=minilm", "data.sample_size=512", "train.epochs=1", "data.eval_size=1000"]
ACCURACY = ["model=minilm", "data.sample_size=5000", "train.epochs=3", *RECIPE]
KEYS = (
    "accuracy",
    "f1_macro",
    "onnx_int8_accuracy",
    "onnx_int8_agreement",
    "train_samples_per_second",
    "train_loop_samples_per_second",
    "train_wall_time_s",
    "peak_rss_mb",
    "train_rows",
    "eval_rows",
)


def run(workdir: Path, overrides: list[str]) -> dict[str, float]:
    cfg = compose(
        [
            f"storage.uri={workdir / 'store'}",
            f"tracking.uri=sqlite:///{workdir / 'mlflow.db'}",
            f"train.output_dir={workdir / 'checkpoints'}",
            f"data.source={AGNEWS_DIR}",
            *overrides,
        ]
    )
    upload(cfg)
    with step_run(cfg, "train"):
        final = train(cfg)
    return {key: final[key] for key in KEYS}


def machine() -> dict[str, str | int]:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count() or 0,
        "torch_threads": torch.get_num_threads(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name", choices=["throughput", "accuracy"])
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    parser.add_argument("--workdir", type=Path, help="keep the store and tracking database here")
    args = parser.parse_intermixed_args()
    name, extra = args.name, args.overrides
    with contextlib.nullcontext(args.workdir) if args.workdir else tempfile.TemporaryDirectory() as tmp:
        if name == "throughput":
            overrides = {
                "seed_recipe": [*THROUGHPUT, "train=seed_recipe", *extra],
                "ours": [*THROUGHPUT, *RECIPE, *extra],
            }
            seed, ours = (run(Path(tmp) / key, value) for key, value in overrides.items())
            result = {
                "seed_recipe": seed,
                "ours": ours,
                # Training speed: samples/s inside the training loop. The Trainer's own samples/s also counts the
                # end-of-epoch evaluation and checkpoint save, whose fixed cost dominates a short run; its ratio is
                # recorded beside it.
                "speedup": ours["train_loop_samples_per_second"] / seed["train_loop_samples_per_second"],
                "speedup_trainer_samples_per_second": ours["train_samples_per_second"]
                / seed["train_samples_per_second"],
                "accuracy_delta_points": 100 * (ours["accuracy"] - seed["accuracy"]),
            }
        else:
            overrides = {name: ACCURACY + extra}
            result = run(Path(tmp) / name, overrides[name])
    result |= {
        "command": " ".join(["python bench/train_bench.py", *sys.argv[1:]]),
        "overrides": overrides,
        "machine": machine(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"train_{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
