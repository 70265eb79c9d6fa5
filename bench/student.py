"""Students distilled from a fine-tuned MiniLM (issue 21): is the model the limit of the Lambda's warm latency?

    python bench/student.py [--layers 1 2 3] [--workdir DIR] [overrides...]

The teacher is fine-tuned as the accuracy benchmark's first seed (MiniLM, 5,000 rows, 3 epochs; validation keeps its
checkpoint). Each student keeps the teacher's embeddings and its first N of 6 layers, and is trained on the same
rows with the same recipe against the teacher's logits on them (knowledge distillation: half the loss the labels',
half the KL divergence from the teacher's softened distribution, temperature 2); validation keeps its checkpoint.
Then each model's int8 bundle, exported as the pipeline exports it, predicts the full test split once (accuracy, and
agreement with the teacher's bundle), and one text and a batch of 32 are timed through it on one pinned CPU, as the
Lambda runs them (tokenization and the onnxruntime run; p50). The issue's rule for serving a student: agreement at
least 99% and at most 0.5 points of accuracy lost. Results go to bench/results/student.json.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from machine import machine
from timing import on_cpu, timings
from train_bench import ACCURACY, AGNEWS_DIR, RESULTS
from transformers import PreTrainedModel

from agnews import names, training
from agnews.config import compose
from agnews.data import StoredDataset, by_length
from agnews.export import export_bundle
from agnews.settings import TrainSettings
from agnews.storage import open_storage
from agnews.tracking import step_run
from agnews.trainer import OrderedEvalTrainer, training_args
from agnews.upload import upload
from bundle.predictor import Predictor

TEMPERATURE = 2.0
LABEL_WEIGHT = 0.5  # the rest on the teacher's softened logits
SERVE_AGREEMENT = 0.99  # the rule for serving a student
SERVE_POINTS_LOST = 0.5


class DistillationTrainer(OrderedEvalTrainer):
    """The Trainer with Hinton et al.'s loss on rows that carry the teacher's logits (``teacher_logits``); rows
    without them (validation) get the plain cross-entropy."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        teacher = inputs.pop("teacher_logits", None)
        outputs = model(**inputs)
        loss = F.cross_entropy(outputs.logits.float(), inputs["labels"])
        if teacher is not None:
            soft = F.kl_div(
                F.log_softmax(outputs.logits.float() / TEMPERATURE, -1),
                F.softmax(teacher.float() / TEMPERATURE, -1),
                reduction="batchmean",
            )
            loss = LABEL_WEIGHT * loss + (1 - LABEL_WEIGHT) * TEMPERATURE**2 * soft
        return (loss, outputs) if return_outputs else loss


def first_layers(teacher: PreTrainedModel, layers: int) -> PreTrainedModel:
    """A copy of ``teacher`` (a BERT-style encoder) with its embeddings, its first ``layers`` layers and its head."""
    student = copy.deepcopy(teacher)
    encoder = getattr(student, student.base_model_prefix).encoder
    encoder.layer = torch.nn.ModuleList(list(encoder.layer)[:layers])
    student.config.num_hidden_layers = layers
    return student


def distillation_sets(teacher: training.FineTuned) -> tuple[datasets.Dataset, datasets.Dataset]:
    """The teacher's training rows with its logits on them (``teacher_logits``), and its validation rows; both with
    only what the collator pads, not the frame's other columns."""
    t = teacher.trainer
    inputs = [*teacher.tokenizer.model_input_names, "labels"]
    train_set, eval_set = (ds.select_columns(inputs) for ds in (t.train_dataset, t.eval_dataset))
    logits = t.predict(train_set).predictions  # in dataset order (OrderedEvalTrainer)
    return train_set.add_column("teacher_logits", logits.astype(np.float32).tolist()), eval_set


def distil(
    train: TrainSettings,
    seed: int,
    teacher: training.FineTuned,
    sets: tuple[datasets.Dataset, datasets.Dataset],
    layers: int,
    output_dir: Path,
) -> training.FineTuned:
    """Train a student of ``layers`` layers on ``sets`` (``distillation_sets``), validation keeping its checkpoint."""
    t = teacher.trainer
    args = training_args(train, seed, output_dir, teacher.resolved)
    args.remove_unused_columns = False  # keep teacher_logits, which the model's forward does not take
    trainer = DistillationTrainer(
        model=first_layers(t.accelerator.unwrap_model(t.model, keep_fp32_wrapper=False), layers),
        args=args,
        train_dataset=sets[0],
        eval_dataset=sets[1],
        processing_class=teacher.tokenizer,
        data_collator=t.data_collator,
        compute_metrics=t.compute_metrics,
    )
    metrics = dict(trainer.train().metrics)
    return training.FineTuned(
        trainer, teacher.tokenizer, metrics, teacher.resolved, teacher.train_frame, teacher.val_frame
    )


def measure(
    train: TrainSettings, tuned: training.FineTuned, labels: list[str], test: pd.DataFrame, bundle_dir: Path, cpu: int
) -> dict[str, Any]:
    """Export the int8 bundle, predict the test split once, and time one text and a batch of 32 on ``cpu``, from
    the test texts in the file's order."""
    trainer = tuned.trainer
    model = trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    export_bundle(
        model, tuned.tokenizer, labels, train.max_length, train.serving_batch_size, bundle_dir, train.onnx_opset
    )
    texts, pool = test.text.tolist(), test.sort_index().text.tolist()
    with on_cpu(cpu):
        predictor = Predictor(bundle_dir)
        predicted = predictor.logits(texts).argmax(1)
        p50 = {
            f"p50_ms_{size}": statistics.median(timings(predictor.logits, pool, size, runs))
            for size, runs in ((1, 300), (32, 30))
        }
    _, val_accuracy = tuned.kept()
    return {
        names.BEST_VAL_ACCURACY: val_accuracy,
        "train_runtime_s": tuned.train_metrics["train_runtime"],
        names.ONNX_INT8_ACCURACY: float((predicted == test.label.to_numpy()).mean()),
        "predicted": predicted,
        "parameters": sum(p.numel() for p in model.parameters()),
        "bundle_mb": sum(f.stat().st_size for f in bundle_dir.iterdir()) / 2**20,
        **p50,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 2, 3], help="the students' layer counts")
    parser.add_argument("--cpu", type=int, default=max(os.sched_getaffinity(0)), help="the CPU the timings run on")
    parser.add_argument("--workdir", type=Path, help="keep the store and checkpoints here")
    parser.add_argument("--output", type=Path, default=RESULTS / "student.json")
    args = parser.parse_intermixed_args()
    load_before = os.getloadavg()[0]
    with contextlib.nullcontext(args.workdir) if args.workdir else tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cfg = compose(
            [
                *(f"storage.uri={work / 'store'}", f"tracking.uri=sqlite:///{work / 'mlflow.db'}"),
                *(f"train.output_dir={work / 'teacher'}", f"data.source={AGNEWS_DIR}"),
                *ACCURACY,
                "seed=42",
                *args.overrides,
            ]
        )
        upload(cfg.data, cfg.storage)
        dataset = StoredDataset.open(open_storage(cfg.storage), cfg.storage.dataset_prefix)
        labels = dataset.info["labels"]
        test = by_length(dataset.split("test"))  # the full test split, read only to measure
        with step_run(cfg, "train"):  # the teacher's per-epoch metrics go to a run of the scratch store
            teacher = training.fine_tune(cfg.train, cfg.data, cfg.model, cfg.seed, dataset)
        models = {"teacher": measure(cfg.train, teacher, labels, test, work / "bundle-teacher", args.cpu)}
        sets = distillation_sets(teacher)
        for layers in args.layers:
            student = distil(cfg.train, cfg.seed, teacher, sets, layers, work / f"student-{layers}")
            models[f"student_{layers}"] = measure(cfg.train, student, labels, test, work / f"bundle-{layers}", args.cpu)
    reference = models["teacher"]
    for figures in list(models.values())[1:]:
        figures["agreement_with_teacher"] = float((figures["predicted"] == reference["predicted"]).mean())
        figures["points_lost"] = 100 * (reference[names.ONNX_INT8_ACCURACY] - figures[names.ONNX_INT8_ACCURACY])
        figures["speedup_one_text"] = reference["p50_ms_1"] / figures["p50_ms_1"]
        figures["speedup_batch_32"] = reference["p50_ms_32"] / figures["p50_ms_32"]
        figures["servable"] = (
            figures["agreement_with_teacher"] >= SERVE_AGREEMENT and figures["points_lost"] <= SERVE_POINTS_LOST
        )
    for figures in models.values():
        del figures["predicted"]
    result = {
        "command": " ".join(["python bench/student.py", *sys.argv[1:]]),
        "overrides": [*ACCURACY, "seed=42", *args.overrides],
        "temperature": TEMPERATURE,
        "label_weight": LABEL_WEIGHT,
        names.TEST_ROWS: len(test),
        "cpu": args.cpu,
        "models": models,
        "load_avg_1m_before": load_before,
        "load_avg_1m_after": os.getloadavg()[0],
        "machine": machine(),
    }
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["models"], indent=2))


if __name__ == "__main__":
    main()
