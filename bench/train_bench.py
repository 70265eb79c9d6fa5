"""Training benchmarks on the real AG News copy, through the library's train function.

    python bench/train_bench.py throughput [overrides...]   # seed recipe vs ours, interleaved rounds
    python bench/train_bench.py accuracy [overrides...]     # minilm, 5,000 rows, 3 epochs, several seeds

Both use the recipes in conf/ (`model=minilm` brings its own; `train=seed_recipe` is the seed's). Each run uploads
AG News (AGNEWS_DIR, default ../shared/data/ag_news) into a store and tracking database under a temporary folder
(or ``--workdir DIR``, kept afterwards, e.g. to register a model and run bench/lambda_latency.py on it), trains,
and the figures go to bench/results/train_<name>.json. Checkpoints are chosen on the validation split; the test
split only measures.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from machine import machine

from agnews import names, precision
from agnews.config import PROJECT_ROOT, compose
from agnews.tracking import step_run
from agnews.training import train
from agnews.upload import upload

RESULTS = PROJECT_ROOT / "bench" / "results"
# The local AG News copy that the benchmarks read (see ../shared/data/ag_news/SOURCES.md).
AGNEWS_DIR = Path(os.environ.get("AGNEWS_DIR", PROJECT_ROOT.parent / "shared" / "data" / "ag_news"))

# The benchmark settings: the issues' protocols, written once here.
THROUGHPUT = ["model=minilm", "data.sample_size=512", "train.epochs=1", "data.val_size=200", "data.test_size=500"]
ACCURACY = ["model=minilm", "data.sample_size=5000", "train.epochs=3"]
KEYS = (
    names.TEST_ACCURACY,
    names.TEST_F1_MACRO,
    names.BEST_VAL_ACCURACY,
    names.ONNX_INT8_ACCURACY,
    names.ONNX_INT8_AGREEMENT,
    names.TRAIN_SAMPLES_PER_SECOND,
    names.TRAIN_LOOP_SAMPLES_PER_SECOND,
    names.TRAIN_WALL_TIME_S,
    names.PEAK_RSS_MB,
    names.TRAIN_ROWS,
    names.VAL_ROWS,
    names.TEST_ROWS,
)


def run(workdir: Path, overrides: list[str]) -> dict[str, float | str]:
    """One upload and train run; its figures and the precision it trained in, with the load average before and
    after."""
    cfg = compose(
        [
            f"storage.uri={workdir / 'store'}",
            f"tracking.uri=sqlite:///{workdir / 'mlflow.db'}",
            f"train.output_dir={workdir / 'checkpoints'}",
            f"data.source={AGNEWS_DIR}",
            *overrides,
        ]
    )
    upload(cfg.data, cfg.storage)
    load_before = os.getloadavg()[0]
    with step_run(cfg, "train"):
        final = train(cfg)
    return {key: final[key] for key in KEYS} | {
        "precision": precision.for_config(cfg.train).precision,
        "load_avg_1m_before": load_before,
        "load_avg_1m_after": os.getloadavg()[0],
    }


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def throughput(tmp: Path, extra: list[str], rounds: int) -> dict:
    """Rounds of seed recipe then ours, alternating, so that a slow spell of the machine hits both sides."""
    sides = {"seed_recipe": [*THROUGHPUT, "train=seed_recipe", *extra], "ours": [*THROUGHPUT, *extra]}
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    for i in range(rounds):
        for side, overrides in sides.items():
            runs[side].append(run(tmp / f"{side}-{i}", overrides))
            print(json.dumps({"round": i, side: runs[side][-1]}), flush=True)

    def ratios(key: str) -> list[float]:
        return [ours[key] / seed[key] for seed, ours in zip(runs["seed_recipe"], runs["ours"], strict=True)]

    return {
        "overrides": sides,
        "runs": runs,
        # Training speed: samples/s inside the training loop; the Trainer's own samples/s also counts the end-of-epoch
        # evaluation and checkpoint save, whose fixed cost weighs on a short run. Both ratios, per round.
        "speedup_training_loop": spread(ratios(names.TRAIN_LOOP_SAMPLES_PER_SECOND)),
        "speedup_trainer_samples_per_second": spread(ratios(names.TRAIN_SAMPLES_PER_SECOND)),
        "accuracy_delta_points": spread(
            [
                100 * (ours[names.TEST_ACCURACY] - seed[names.TEST_ACCURACY])
                for seed, ours in zip(runs["seed_recipe"], runs["ours"], strict=True)
            ]
        ),
    }


def accuracy(tmp: Path, extra: list[str], seeds: list[int]) -> dict:
    """The same recipe under several seeds (sample, initialisation of the head, order): mean and spread."""
    overrides = {seed: [*ACCURACY, f"seed={seed}", *extra] for seed in seeds}
    runs = {}
    for seed, values in overrides.items():
        runs[seed] = run(tmp / f"seed-{seed}", values)
        print(json.dumps({"seed": seed, **runs[seed]}), flush=True)

    def summary(key: str) -> dict[str, float]:
        values = [r[key] for r in runs.values()]
        return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}

    keys = (names.TEST_ACCURACY, names.ONNX_INT8_ACCURACY, names.BEST_VAL_ACCURACY, names.TEST_F1_MACRO)
    return {"overrides": overrides, "runs": runs, **{key: summary(key) for key in keys}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name", choices=["throughput", "accuracy"])
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    parser.add_argument("--workdir", type=Path, help="keep the stores and tracking databases here")
    parser.add_argument("--rounds", type=int, default=3, help="throughput: seed/ours pairs, interleaved")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44], help="accuracy: one run per seed")
    parser.add_argument("--output", type=Path, help="where to write the JSON (default bench/results/train_<name>.json)")
    args = parser.parse_intermixed_args()
    with contextlib.nullcontext(args.workdir) if args.workdir else tempfile.TemporaryDirectory() as tmp:
        if args.name == "throughput":
            result = throughput(Path(tmp), args.overrides, args.rounds)
        else:
            result = accuracy(Path(tmp), args.overrides, args.seeds)
    result |= {"command": " ".join(["python bench/train_bench.py", *sys.argv[1:]]), "machine": machine()}
    output = args.output or RESULTS / f"train_{args.name}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
