"""Training: fine-tune with the HF Trainer, log metrics and reports to MLflow, log the pyfunc with its int8 bundle."""

from __future__ import annotations

import logging
import os
import re
import resource
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import datasets
import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.models import infer_signature
from sklearn.model_selection import train_test_split
from torch.utils.data import SequentialSampler
from transformers import (
    DataCollatorWithPadding,
    EarlyStoppingCallback,
    PreTrainedTokenizerFast,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from agnews import behaviour, checkpoints, export, metrics, precision, pyfunc
from agnews.data import StoredDataset, rows_sha256
from agnews.errors import DataError
from agnews.ingest import log_frame
from agnews.modeling import load_model, load_tokenizer
from agnews.names import TEST_ROWS_TAG
from agnews.progress import phase
from agnews.settings import Settings, TrainSettings
from agnews.storage import open_storage
from bundle import layout
from bundle.predictor import Predictor, softmax

log = logging.getLogger(__name__)

# Pinned in the logged model's requirements; the versions are those installed, which requirements.txt pins.
MODEL_REQUIREMENTS = ("torch", "transformers", "pandas", "numpy")
INPUT_EXAMPLE = [
    "Apple reported strong quarterly earnings with iPhone sales up 15%",
    "The Red Sox beat the Yankees 5-3 to win the pennant",
]


# The training figures logged with the final metrics: the Trainer's samples/s (which includes the per-epoch
# evaluation and checkpoint saves), the training loop's alone, and the wall time of trainer.train().
TRAIN_FIGURES = ("train_samples_per_second", "train_loop_samples_per_second", "train_wall_time_s")


def is_main_process() -> bool:
    """Rank 0, or a single process: torchrun and accelerate launch set RANK before any process group exists."""
    return int(os.environ.get("RANK", "0")) == 0


def draw(frame: pd.DataFrame, size: int | None, seed: int, name: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``size`` rows with the class balance of ``frame``, seeded, and the rows left; None or 0 draws every row.
    Rows keep their index: ``read_split``'s line numbers, which name the rows scored (``dataset.test.rows_sha256``)."""
    if not size or size == len(frame):
        return frame, frame.iloc[:0]
    if size > len(frame):
        raise DataError(f"{name}={size} is larger than the {len(frame)} rows available")
    sample, rest = train_test_split(frame, train_size=size, stratify=frame.label, random_state=seed)
    return sample, rest


def stratified_sample(frame: pd.DataFrame, size: int | None, seed: int, name: str) -> pd.DataFrame:
    """``size`` rows with the class balance of ``frame``, seeded; None or 0 keeps every row."""
    return draw(frame, size, seed, name)[0]


def split_train(frame: pd.DataFrame, sample_size: int | None, val_size: int, seed: int) -> tuple[pd.DataFrame, ...]:
    """The training sample and the validation rows: disjoint, stratified and seeded.

    The training sample is drawn first, exactly as without validation, and validation from the rows it leaves;
    only when it leaves too few (``sample_size`` null, or near the split's size) is validation drawn first.
    """
    if sample_size and sample_size + val_size <= len(frame):
        sample, rest = draw(frame, sample_size, seed, "data.sample_size")
        return sample, draw(rest, val_size, seed, "data.val_size")[0]
    if sample_size and sample_size > len(frame):
        raise DataError(f"data.sample_size={sample_size} is larger than the {len(frame)} rows available")
    val, rest = draw(frame, val_size, seed, "data.val_size")
    if sample_size and sample_size > len(rest):
        raise DataError(
            f"data.sample_size={sample_size} is larger than the {len(rest)} rows left after data.val_size={val_size}"
        )
    return stratified_sample(rest, sample_size, seed, "data.sample_size"), val


def by_length(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows sorted by text length (stable), with their index: evaluation batches then pad little, in a known order."""
    return frame.iloc[frame.text.str.len().argsort(kind="stable")]


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
    sorted by length once (see ``fit``), which keeps padding as low without losing the order.
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


def training_args(cfg: Settings, output_dir: Path, resolved: precision.Resolved) -> TrainingArguments:
    """The Trainer's arguments: the recipe from ``train``, with the precision and DataLoader settings resolved for
    the device."""
    t = cfg.train
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
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to="none",
        **resolved.trainer_kwargs,
    )


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


def fine_tune(cfg: Settings, dataset: StoredDataset, callbacks: Sequence[TrainerCallback] = ()) -> FineTuned:
    """Load the training and validation rows and the model, and fine-tune with validation choosing the checkpoint.

    The test split is neither read nor predicted: a hyperparameter search trial (agnews/tuning.py) stops here.
    """
    # Once per run, before any data or model is loaded: a precision this device cannot run fails here.
    resolved = precision.for_config(cfg.train)
    labels = dataset.info["labels"]
    train_frame, val_frame = split_train(dataset.split("train"), cfg.data.sample_size, cfg.data.val_size, cfg.seed)
    val_frame = by_length(val_frame)
    set_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model, labels, tokenizer)

    output_dir = Path(cfg.train.output_dir)
    checkpoint = checkpoints.prepare(output_dir, cfg.train.resume, main_process=is_main_process())

    def compute_metrics(prediction) -> dict[str, float]:
        return metrics.classification_metrics(labels, prediction.label_ids, prediction.predictions.argmax(-1))

    extra = list(callbacks)
    if cfg.train.early_stopping_patience:
        extra.append(EarlyStoppingCallback(early_stopping_patience=cfg.train.early_stopping_patience))
    clock = TrainingClock()
    trainer = OrderedEvalTrainer(
        model=model,
        args=training_args(cfg, output_dir, resolved),
        train_dataset=tokenize(train_frame, tokenizer, cfg.train),
        eval_dataset=tokenize(val_frame, tokenizer, cfg.train),
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer, pad_to_multiple_of=resolved.pad_to_multiple_of),
        compute_metrics=compute_metrics,
        callbacks=[MlflowMetrics(), clock, *extra],
    )
    started = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=checkpoint)
    samples = result.metrics["train_samples_per_second"] * result.metrics["train_runtime"]
    train_metrics = dict(result.metrics) | {
        "train_wall_time_s": time.perf_counter() - started,
        "train_loop_samples_per_second": samples / clock.seconds if clock.seconds else 0.0,
    }
    return FineTuned(trainer, tokenizer, train_metrics, resolved, train_frame, val_frame)


def fit(cfg: Settings, dataset: StoredDataset, callbacks: Sequence[TrainerCallback] = ()) -> Fitted:
    """Fine-tune (``fine_tune``), then predict the test split once with the kept (best) checkpoint.

    The test rows are drawn first, so that a bad ``data.test_size`` fails before any training.
    """
    test_frame = by_length(stratified_sample(dataset.split("test"), cfg.data.test_size, cfg.seed, "data.test_size"))
    tuned = fine_tune(cfg, dataset, callbacks)
    log.info("predicting the %d test rows with the kept checkpoint", len(test_frame))
    test_set = tokenize(test_frame, tuned.tokenizer, cfg.train)
    logits = tuned.trainer.predict(test_set, metric_key_prefix="test").predictions
    assert isinstance(logits, np.ndarray)  # a classifier has one output, not a tuple of them
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return Fitted(**vars(tuned), test_frame=test_frame, probs=probs)


def log_evaluation(cfg: Settings, fitted: Fitted, labels: list[str]) -> dict[str, float]:
    """Test metrics (``test_*``), the kept checkpoint, confusion matrix, classification report, misclassified texts."""
    y_true = fitted.test_frame.label.to_numpy()
    y_pred = fitted.probs.argmax(1)
    checkpoint, best_val_accuracy = fitted.kept()
    test = {f"test_{k}": v for k, v in metrics.classification_metrics(labels, y_true, y_pred).items()}
    final = test | {
        **{key: fitted.train_metrics[key] for key in TRAIN_FIGURES},
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "train_rows": len(fitted.train_frame),
        "val_rows": len(fitted.val_frame),
        "test_rows": len(y_true),
        "best_val_accuracy": best_val_accuracy,
    }
    mlflow.set_tags(
        {
            "best_checkpoint": checkpoint,
            "dataset.test.rows": str(len(y_true)),
            TEST_ROWS_TAG: rows_sha256(fitted.test_frame.index),
        }
    )
    mlflow.log_metrics(final)
    mlflow.log_figure(metrics.confusion_figure(labels, y_true, y_pred), "confusion_matrix.png")
    mlflow.log_dict(metrics.report(labels, y_true, y_pred), "classification_report.json")
    texts = fitted.test_frame.text.tolist()
    mlflow.log_table(
        metrics.misclassified(labels, texts, y_true, fitted.probs, cfg.data.misclassified_examples),
        "misclassified.json",
    )
    return final


def log_model(cfg: Settings, fitted: Fitted, labels: list[str], workdir: Path) -> dict[str, float]:
    """Save the model and its int8 bundle, check the bundle against torch, log the pyfunc, and run the behavioural
    checks on both (the pyfunc as logged, the bundle as the Lambda runs it)."""
    model_dir, bundle_dir = workdir / pyfunc.WEIGHTS_ARTIFACT, workdir / pyfunc.BUNDLE_ARTIFACT
    fitted.trainer.save_model(str(model_dir))
    export.export_bundle(
        # Without the autocast wrapper that mixed precision puts around forward: on a CPU it would trace in bf16.
        fitted.trainer.accelerator.unwrap_model(fitted.trainer.model, keep_fp32_wrapper=False),
        fitted.tokenizer,
        labels,
        cfg.train.max_length,
        cfg.train.serving_batch_size,
        bundle_dir,
        cfg.train.onnx_opset,
    )
    texts = fitted.test_frame.text.tolist()
    bundle = Predictor(bundle_dir)
    with phase(f"int8 check: the {len(texts)} test texts through the bundle"):
        int8_pred = bundle.logits(texts).argmax(1)
    checks = {
        "onnx_int8_accuracy": float((int8_pred == fitted.test_frame.label.to_numpy()).mean()),
        "onnx_int8_agreement": float((int8_pred == fitted.probs.argmax(1)).mean()),
    }

    # One unnamed string column: MLflow then accepts a list of strings as well as a DataFrame with a `text` column.
    example = pd.DataFrame({"text": INPUT_EXAMPLE})
    output = pd.DataFrame({"predicted_class": labels[:1], "confidence": [1.0]}).join(
        pd.DataFrame([[0.25] * len(labels)], columns=labels)
    )
    logged = mlflow.pyfunc.log_model(
        name=pyfunc.LOGGED_MODEL,
        python_model=pyfunc.__file__,
        artifacts={pyfunc.WEIGHTS_ARTIFACT: str(model_dir), pyfunc.BUNDLE_ARTIFACT: str(bundle_dir)},
        code_paths=[str(Path(layout.__file__).parent)],
        model_config={"batch_size": cfg.train.eval_batch_size},
        signature=infer_signature(INPUT_EXAMPLE, output),
        input_example=example,
        pip_requirements=[f"{name}=={version(name)}" for name in MODEL_REQUIREMENTS],
    )
    with phase("behavioural checks on the logged pyfunc and on the int8 bundle"):
        logged_model = mlflow.pyfunc.load_model(logged.model_uri)
        results = {
            "behaviour": behaviour.check(lambda batch: logged_model.predict(batch)[labels].to_numpy(), labels),
            "onnx_int8_behaviour": behaviour.check(lambda batch: softmax(bundle.logits(batch)), labels),
        }
    failures = []
    for prefix, result in results.items():
        checks |= result.metrics(prefix)
        failures.append(result.failures.assign(model=prefix))
    mlflow.log_metrics(checks)
    mlflow.log_table(pd.concat(failures, ignore_index=True), "behaviour_failures.json")
    log.info("behavioural checks: %s", ", ".join(f"{name} {checks[f'{name}_pass_rate']:.0%}" for name in results))
    return checks


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
    fitted = fit(cfg, dataset, callbacks)
    if not fitted.trainer.is_world_process_zero():
        return {}
    labels = dataset.info["labels"]  # as fine_tune gave them to the model
    mlflow.set_tags({f"dataset.{name.split('.')[0]}.sha256": f["sha256"] for name, f in dataset.info["files"].items()})
    log_inputs(dataset, fitted)
    mlflow.set_tags(fitted.resolved.tags())
    final = log_evaluation(cfg, fitted, labels)
    with tempfile.TemporaryDirectory() as tmp:
        final |= log_model(cfg, fitted, labels, Path(tmp))
    log.info(
        "test accuracy %.4f, macro-F1 %.4f, int8 accuracy %.4f (checkpoint %s, chosen on validation)",
        final["test_accuracy"],
        final["test_f1_macro"],
        final["onnx_int8_accuracy"],
        fitted.kept()[0],
    )
    return final
