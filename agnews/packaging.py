"""What the train step ships: the ONNX int8 serving bundle checked against torch on the test split, the MLflow pyfunc
that carries it, and the behavioural checks run on both (the pyfunc as logged, the bundle as the Lambda runs it)."""

from __future__ import annotations

import logging
from importlib.metadata import version
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.models import infer_signature
from transformers import PreTrainedTokenizerFast, Trainer

from agnews import behaviour, export, pyfunc
from agnews.monitoring import reference
from agnews.names import (
    BEHAVIOUR,
    BEHAVIOUR_FAILURES_ARTIFACT,
    ONNX_INT8_ACCURACY,
    ONNX_INT8_AGREEMENT,
    ONNX_INT8_BEHAVIOUR,
)
from agnews.progress import phase
from agnews.settings import TrainSettings
from bundle import layout
from bundle.predictor import Predictor, softmax

log = logging.getLogger(__name__)

# Pinned in the logged model's requirements; the versions are those installed, which requirements.txt pins.
MODEL_REQUIREMENTS = ("torch", "transformers", "pandas", "numpy")
INPUT_EXAMPLE = [
    "Apple reported strong quarterly earnings with iPhone sales up 15%",
    "The Red Sox beat the Yankees 5-3 to win the pennant",
]


def log_model(
    trainer: Trainer,
    tokenizer: PreTrainedTokenizerFast,
    labels: list[str],
    t: TrainSettings,
    test: tuple[pd.DataFrame, np.ndarray],
    validation: list[str],
    workdir: Path,
) -> dict[str, float]:
    """Save the model and its int8 bundle, check the bundle on the ``test`` rows against torch's probabilities for
    them, log the bundle's answers on the ``validation`` texts as the version's reference profile (the monitor step's),
    log the pyfunc, and run the behavioural checks on both; returns the checks' metrics."""
    test_frame, probs = test
    model_dir, bundle_dir = workdir / pyfunc.WEIGHTS_ARTIFACT, workdir / pyfunc.BUNDLE_ARTIFACT
    trainer.save_model(str(model_dir))
    export.export_bundle(
        # Without the autocast wrapper that mixed precision puts around forward: on a CPU it would trace in bf16.
        trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False),
        tokenizer,
        labels,
        t.max_length,
        t.serving_batch_size,
        bundle_dir,
        t.onnx_opset,
    )
    texts = test_frame.text.tolist()
    bundle = Predictor(bundle_dir)
    with phase(f"reference profile: the {len(validation)} validation texts through the bundle"):
        reference.log_profile(bundle, validation, workdir)
    with phase(f"int8 check: the {len(texts)} test texts through the bundle"):
        int8_pred = bundle.logits(texts).argmax(1)
    checks = {
        ONNX_INT8_ACCURACY: float((int8_pred == test_frame.label.to_numpy()).mean()),
        ONNX_INT8_AGREEMENT: float((int8_pred == probs.argmax(1)).mean()),
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
        model_config={"batch_size": t.eval_batch_size},
        signature=infer_signature(INPUT_EXAMPLE, output),
        input_example=example,
        pip_requirements=[f"{name}=={version(name)}" for name in MODEL_REQUIREMENTS],
    )
    with phase("behavioural checks on the logged pyfunc and on the int8 bundle"):
        logged_model = mlflow.pyfunc.load_model(logged.model_uri)
        results = {
            BEHAVIOUR: behaviour.check(lambda batch: logged_model.predict(batch)[labels].to_numpy(), labels),
            ONNX_INT8_BEHAVIOUR: behaviour.check(lambda batch: softmax(bundle.logits(batch)), labels),
        }
    failures = []
    for prefix, result in results.items():
        checks |= result.metrics(prefix)
        failures.append(result.failures.assign(model=prefix))
    mlflow.log_metrics(checks)
    mlflow.log_table(pd.concat(failures, ignore_index=True), BEHAVIOUR_FAILURES_ARTIFACT)
    log.info("behavioural checks: %s", ", ".join(f"{name} {checks[f'{name}_pass_rate']:.0%}" for name in results))
    return checks
