"""The HF Trainer as the train step sets it up: tokenized splits, the arguments from ``train``, evaluation in
dataset order, and the callbacks that log to MLflow and time the training loop."""

from __future__ import annotations

import re
import time
from pathlib import Path

import datasets
import mlflow
import pandas as pd
import torch
from torch.utils.data import SequentialSampler
from transformers import PreTrainedTokenizerFast, Trainer, TrainerCallback, TrainingArguments

from agnews import precision
from agnews.settings import TrainSettings


def tokenize(frame: pd.DataFrame, tokenizer: PreTrainedTokenizerFast, t: TrainSettings) -> datasets.Dataset:
    padding = "max_length" if t.pad_to_max_length else False
    ds = datasets.Dataset.from_pandas(frame.rename(columns={"label": "labels"}), preserve_index=False)
    return ds.map(
        lambda batch: tokenizer(batch["text"], truncation=True, max_length=t.max_length, padding=padding),
        batched=True,
        remove_columns=["text"],
        desc="tokenize",
    )


class OrderedEvalTrainer(Trainer):
    """A Trainer that evaluates in dataset order, so that predictions line up with the eval rows.

    With length grouping, transformers 5 also shuffles evaluation batches by length; the eval split is instead
    sorted by length once (see ``training.fine_tune``), which keeps padding as low without losing the order.
    """

    def _get_eval_sampler(self, eval_dataset: datasets.Dataset) -> torch.utils.data.Sampler | None:
        return SequentialSampler(eval_dataset) if self.args.world_size <= 1 else None


class MlflowMetrics(TrainerCallback):
    """Logs the Trainer's loss, learning rate and validation metrics, by global step, into the active run.

    The Trainer evaluates on the validation split and calls those metrics ``eval_*``: they are logged as ``val_*``.
    transformers' own MLflowCallback reopens MLFLOW_RUN_ID, which collides with the run that `mlflow run` and the
    main pipeline already hold open, so the step logs through this callback instead.
    """

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            values = {re.sub(r"^eval_", "val_", k): float(v) for k, v in logs.items() if isinstance(v, int | float)}
            mlflow.log_metrics(values, step=state.global_step)


class TrainingClock(TrainerCallback):
    """Seconds spent inside the training epochs, leaving out the per-epoch evaluation and checkpoint saves."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._started = 0.0

    def on_epoch_begin(self, args, state, control, **kwargs):
        self._started = time.perf_counter()

    def on_epoch_end(self, args, state, control, **kwargs):
        self.seconds += time.perf_counter() - self._started


def training_args(t: TrainSettings, seed: int, output_dir: Path, resolved: precision.Resolved) -> TrainingArguments:
    """The Trainer's arguments: the recipe from ``train``, with the precision and DataLoader settings resolved for
    the device."""
    return TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=t.epochs,
        learning_rate=t.learning_rate,
        weight_decay=t.weight_decay,
        label_smoothing_factor=t.label_smoothing,
        warmup_steps=t.warmup_ratio,
        lr_scheduler_type=t.lr_scheduler,
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.eval_batch_size,
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        eval_strategy="epoch",
        save_strategy="epoch",
        load_best_model_at_end=True,
        metric_for_best_model="accuracy",  # on the validation split (eval_dataset)
        save_total_limit=t.save_total_limit,
        logging_steps=t.logging_steps,
        seed=seed,
        data_seed=seed,
        report_to="none",
        **resolved.trainer_kwargs,
    )
