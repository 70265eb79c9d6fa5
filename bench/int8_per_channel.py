"""int8 weights with a scale per output channel against one per tensor, on one fine-tuned model (issue 21, item 6).

    python bench/int8_per_channel.py --workdir /tmp/student [--cpu N]

Takes the checkpoint that validation kept in ``<workdir>/teacher`` and the dataset in ``<workdir>/store``, as
bench/student.py leaves them. Exports the int8 bundle both ways, as the pipeline exports it; each predicts the full
test split once (accuracy, and agreement with the float32 torch model), then both are timed on one pinned CPU in
interleaved rounds, one text and a batch of 32 (p50). Results go to bench/results/int8_per_channel.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
from machine import machine
from timing import on_cpu, timings
from train_bench import RESULTS
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from transformers.trainer import TRAINER_STATE_NAME

from agnews import checkpoints, names
from agnews.config import compose
from agnews.data import StoredDataset
from agnews.export import export_bundle
from agnews.storage import open_storage
from bundle.predictor import Predictor

ROUNDS = 4


def kept_checkpoint(output_dir: Path) -> Path:
    """The checkpoint that validation kept, as the Trainer's state of the newest one names it."""
    newest = checkpoints.found(output_dir)[0]
    return Path(json.loads((newest / TRAINER_STATE_NAME).read_text())["best_model_checkpoint"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, required=True, help="bench/student.py's --workdir")
    parser.add_argument("--cpu", type=int, default=max(os.sched_getaffinity(0)), help="the CPU the timings run on")
    parser.add_argument("--output", type=Path, default=RESULTS / "int8_per_channel.json")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    checkpoint = kept_checkpoint(args.workdir / "teacher")
    model = AutoModelForSequenceClassification.from_pretrained(checkpoint).eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    cfg = compose([f"storage.uri={args.workdir / 'store'}", "model=minilm"])
    dataset = StoredDataset.open(open_storage(cfg.storage), cfg.storage.dataset_prefix)
    test, labels = dataset.split("test"), dataset.info["labels"]
    texts, truth = test.text.tolist(), test.label.to_numpy()
    t = cfg.train
    with torch.no_grad():
        torch_pred = np.concatenate(
            [
                model(
                    **tokenizer(
                        texts[i : i + 64], truncation=True, max_length=t.max_length, padding=True, return_tensors="pt"
                    )
                )
                .logits.argmax(-1)
                .numpy()
                for i in range(0, len(texts), 64)
            ]
        )
    bundles = {}
    for name, per_channel in (("per_tensor", False), ("per_channel", True)):
        folder = args.workdir / f"bundle-{name}"
        export_bundle(model, tokenizer, labels, t.max_length, t.serving_batch_size, folder, t.onnx_opset, per_channel)
        bundles[name] = folder
    with on_cpu(args.cpu):
        predictors = {name: Predictor(folder) for name, folder in bundles.items()}  # one onnxruntime thread
        figures: dict[str, dict] = {}
        for name, predictor in predictors.items():
            predicted = predictor.logits(texts).argmax(1)
            figures[name] = {
                names.ONNX_INT8_ACCURACY: float((predicted == truth).mean()),
                "agreement_with_torch": float((predicted == torch_pred).mean()),
                "p50_ms_1": [],
                "p50_ms_32": [],
            }
        for _ in range(ROUNDS):
            for name, predictor in predictors.items():
                for size, runs in ((1, 300), (32, 30)):
                    figures[name][f"p50_ms_{size}"].append(
                        statistics.median(timings(predictor.logits, texts, size, runs))
                    )
    slower = {
        f"per_channel_over_per_tensor_{size}": statistics.median(figures["per_channel"][f"p50_ms_{size}"])
        / statistics.median(figures["per_tensor"][f"p50_ms_{size}"])
        for size in (1, 32)
    }
    result = {
        "command": " ".join(["python bench/int8_per_channel.py", *sys.argv[1:]]),
        "checkpoint": checkpoint.name,
        "torch_accuracy": float((torch_pred == truth).mean()),
        names.TEST_ROWS: len(texts),
        "cpu": args.cpu,
        "rounds": ROUNDS,
        "bundles": figures,
        **slower,
        "load_avg_1m_before": load_before,
        "load_avg_1m_after": os.getloadavg()[0],
        "machine": machine(),
    }
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({key: value for key, value in result.items() if key != "machine"}, indent=2))


if __name__ == "__main__":
    main()
