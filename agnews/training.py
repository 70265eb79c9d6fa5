"""Training: fine-tune with the HF Trainer, with validation choosing the checkpoint, predict the test split once, and
log the evaluation, the rows used and the packaged model (agnews/packaging.py) into the active run."""

from __future__ import annotations

import logging
import os
import resource
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from transformers import (
    DataCollatorWithPadding,
    EarlyStoppingCallback,
    PreTrainedTokenizerFast,
    Trainer,
    TrainerCallback,
    set_seed,
)

from agnews import checkpoints, metrics, names, packaging, precision
from agnews.data import StoredDataset, by_length, rows_sha256, split_train, stratified_sample
from agnews.modeling import load_model, load_tokenizer
from agnews.settings import DataSettings, ModelSettings, Settings, TrainSettings
from agnews.storage import open_storage
from agnews.trainer import MlflowMetrics, OrderedEvalTrainer, TrainingClock, tokenize, training_args
from agnews.upload import log_frame

log = logging.getLogger(__name__)


def is_main_process() -> bool:
    """Rank 0, or a single process: torchrun and accelerate launch set RANK before any process group exists."""
    return int(os.environ.get("RANK", "0")) == 0


@dataclass
class FineTuned:
    """A fine-tuned model with the checkpoint that validation chose; the test split has not been read."""

    trainer: Trainer
    tokenizer: PreTrainedTokenizerFast
    train_metrics: dict[str, float]
    resolved: precision.Resolved  # the precision and device settings the run trained with
    train_frame: pd.DataFrame
    val_frame: pd.DataFrame

    def kept(self) -> tuple[str, float]:
        """The checkpoint folder that validation kept (``checkpoint-<step>``) and its validation accuracy."""
        state = self.trainer.state
        assert state.best_model_checkpoint is not None and state.best_metric is not None, "validation never ran"
        return Path(state.best_model_checkpoint).name, state.best_metric


@dataclass
class Fitted(FineTuned):
    """A fine-tuned model and its one prediction of the test split."""

    test_frame: pd.DataFrame
    probs: np.ndarray  # test rows x classes, from the kept checkpoint


def fine_tune(
    train: TrainSettings,
    data: DataSettings,
    model: ModelSettings,
    seed: int,
    dataset: StoredDataset,
    callbacks: Sequence[TrainerCallback] = (),
) -> FineTuned:
    """Load the training and validation rows and the model, and fine-tune with validation choosing the checkpoint.

    The test split is neither read nor predicted: a hyperparameter search trial (agnews/tuning.py) stops here.
    """
    # Once per run, before any data or model is loaded: a precision this device cannot run fails here.
    resolved = precision.for_config(train)
    labels = dataset.info["labels"]
    train_frame, val_frame = split_train(dataset.split("train"), data.sample_size, data.val_size, seed)
    val_frame = by_length(val_frame)
    set_seed(seed)
    tokenizer = load_tokenizer(model)
    classifier = load_model(model, labels, tokenizer)

    output_dir = Path(train.output_dir)
    checkpoint = checkpoints.prepare(output_dir, train.resume, main_process=is_main_process())

    def compute_metrics(prediction) -> dict[str, float]:
        return metrics.classification_metrics(labels, prediction.label_ids, prediction.predictions.argmax(-1))

    extra = list(callbacks)
    if train.early_stopping_patience:
        extra.append(EarlyStoppingCallback(early_stopping_patience=train.early_stopping_patience))
    clock = TrainingClock()
    trainer = OrderedEvalTrainer(
        model=classifier,
        args=training_args(train, seed, output_dir, resolved),
        train_dataset=tokenize(train_frame, tokenizer, train),
        eval_dataset=tokenize(val_frame, tokenizer, train),
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer, pad_to_multiple_of=resolved.pad_to_multiple_of),
        compute_metrics=compute_metrics,
        callbacks=[MlflowMetrics(), clock, *extra],
    )
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=checkpoint)
    samples = result.metrics[names.TRAIN_SAMPLES_PER_SECOND] * result.metrics["train_runtime"]
    train_metrics = dict(result.metrics) | {
        names.TRAIN_WALL_TIME_S: time.perf_counter() - started,
        names.TRAIN_LOOP_SAMPLES_PER_SECOND: samples / clock.seconds if clock.seconds else 0.0,
    }
    return FineTuned(trainer, tokenizer, train_metrics, resolved, train_frame, val_frame)


def predict_test(train: TrainSettings, tuned: FineTuned, test_frame: pd.DataFrame) -> Fitted:
    """Predict the test rows once with the checkpoint that validation kept (best)."""
    log.info("predicting the %d test rows with the kept checkpoint", len(test_frame))
    test_set = tokenize(test_frame, tuned.tokenizer, train)
    logits = tuned.trainer.predict(test_set, metric_key_prefix="test").predictions
    assert isinstance(logits, np.ndarray)  # a classifier has one output, not a tuple of them
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return Fitted(**vars(tuned), test_frame=test_frame, probs=probs)


def log_evaluation(data: DataSettings, fitted: Fitted, labels: list[str]) -> dict[str, float]:
    """Test metrics (``test_*``), the kept checkpoint, confusion matrix, classification report, misclassified texts."""
    y_true = fitted.test_frame.label.to_numpy()
    y_pred = fitted.probs.argmax(1)
    checkpoint, best_val_accuracy = fitted.kept()
    test = {f"test_{k}": v for k, v in metrics.classification_metrics(labels, y_true, y_pred).items()}
    final = test | {
        **{key: fitted.train_metrics[key] for key in names.TRAIN_FIGURES},
        names.PEAK_RSS_MB: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        names.TRAIN_ROWS: len(fitted.train_frame),
        names.VAL_ROWS: len(fitted.val_frame),
        names.TEST_ROWS: len(y_true),
        names.BEST_VAL_ACCURACY: best_val_accuracy,
    }
    mlflow.set_tags(
        {
            names.BEST_CHECKPOINT_TAG: checkpoint,
            names.TEST_ROWS_COUNT_TAG: str(len(y_true)),
            names.TEST_ROWS_TAG: rows_sha256(fitted.test_frame.index),
        }
    )
    mlflow.log_metrics(final)
    mlflow.log_figure(metrics.confusion_figure(labels, y_true, y_pred), names.CONFUSION_MATRIX_ARTIFACT)
    mlflow.log_dict(metrics.report(labels, y_true, y_pred), names.CLASSIFICATION_REPORT_ARTIFACT)
    texts = fitted.test_frame.text.tolist()
    mlflow.log_table(
        metrics.misclassified(labels, texts, y_true, fitted.probs, data.misclassified_examples),
        names.MISCLASSIFIED_ARTIFACT,
    )
    return final


def log_inputs(dataset: StoredDataset, fitted: Fitted) -> None:
    """The rows the run trained, validated and was tested on, as ``mlflow.data`` inputs (the UI's "Datasets used")."""
    for split, frame, context in (
        ("train", fitted.train_frame, "training"),
        ("train", fitted.val_frame, "validation"),
        ("test", fitted.test_frame, "test"),
    ):
        log_frame(frame[["text", "label"]], dataset.url(split), f"ag_news-{context}", context)


def train(cfg: Settings, callbacks: Sequence[TrainerCallback] = ()) -> dict[str, float]:
    """Fine-tune and, on the main process, log metrics, artifacts and the model into the active run."""
    dataset = StoredDataset.open(open_storage(cfg.storage), cfg.storage.dataset_prefix)
    # the test rows first: a bad data.test_size fails before any training
    test_rows = by_length(stratified_sample(dataset.split("test"), cfg.data.test_size, cfg.seed, "data.test_size"))
    fitted = predict_test(cfg.train, fine_tune(cfg.train, cfg.data, cfg.model, cfg.seed, dataset, callbacks), test_rows)
    if not fitted.trainer.is_world_process_zero():
        return {}
    labels = dataset.info["labels"]  # as fine_tune gave them to the model
    mlflow.set_tags(
        {tag: dataset.info["files"][f"{split}.jsonl"]["sha256"] for split, tag in names.SPLIT_SHA256_TAGS.items()}
    )
    log_inputs(dataset, fitted)
    mlflow.set_tags(fitted.resolved.tags())
    final = log_evaluation(cfg.data, fitted, labels)
    with tempfile.TemporaryDirectory() as tmp:
        test = fitted.test_frame, fitted.probs
        validation = fitted.val_frame.text.tolist()
        final |= packaging.log_model(fitted.trainer, fitted.tokenizer, labels, cfg.train, test, validation, Path(tmp))
    log.info(
        "test accuracy %.4f, macro-F1 %.4f, int8 accuracy %.4f (checkpoint %s, chosen on validation)",
        final[names.TEST_ACCURACY],
        final[names.TEST_F1_MACRO],
        final[names.ONNX_INT8_ACCURACY],
        fitted.kept()[0],
    )
    return final
