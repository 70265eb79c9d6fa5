"""What scores the rows, wherever they are scored: the verified bundle, the Lambda's Predictor, the output's columns.

Each text runs through the model alone, as the Lambda runs a request of one text: the int8 model quantizes its
activations with a scale per ONNX call, so a text batched with others gets logits that depend on its neighbours (by
about 1e-4 on AG News). Alone, a row's answer depends on its text only: it is the same whatever the chunk, the
partition or the engine, and it is the Lambda's answer to that text.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from agnews.errors import ModelError
from bundle.layout import CONFIG_FILE, MANIFEST, ContractError, parse_config, parse_manifest, sha256
from bundle.predictor import Predictor, session_options

PREDICTED_CLASS, CONFIDENCE, ERROR = "predicted_class", "confidence", "error"
MODEL_NAME, MODEL_VERSION, MANIFEST_SHA256 = "model_name", "model_version", "manifest_sha256"


@dataclass(frozen=True)
class Model:
    """The version a job scores with: its name, number, manifest sha256 (the ``champion.json`` that the mirror would
    write names the same one), its labels in logit order, and the folder its bundle and manifest are in."""

    name: str
    version: int
    manifest_sha256: str
    labels: tuple[str, ...]
    folder: Path


def verified(folder: Path) -> str:
    """The sha256 of ``folder``'s manifest, once every file it lists has been read and found to hold its sha256;
    a ModelError otherwise."""
    where = folder / MANIFEST
    try:
        data = where.read_bytes()
        manifest = parse_manifest(data, str(where))
        for name, expected in manifest.files.items():
            if sha256((folder / name).read_bytes()) != expected:
                raise ModelError(f"{folder / name} does not hold the sha256 that {where} names")
    except (OSError, ContractError) as exc:
        raise ModelError(f"the bundle in {folder} cannot be verified: {exc}") from None
    return sha256(data)


def labels(folder: Path) -> tuple[str, ...]:
    """The bundle's labels, in logit order (its ``config.json``)."""
    return tuple(parse_config((folder / CONFIG_FILE).read_bytes(), str(folder / CONFIG_FILE)).labels)


@functools.cache
def predictor(folder: Path, manifest_sha256: str) -> Predictor:
    """The bundle in ``folder`` as a Predictor, once per process, after its files are verified against the manifest
    whose sha256 the job took: on one onnxruntime thread, as each process scores its own rows."""
    found = verified(folder)
    if found != manifest_sha256:
        raise ModelError(f"{folder}: manifest sha256 {found[:12]}..., not the {manifest_sha256[:12]}... of the job")
    return Predictor(folder, session_options(1, None))


def problem(text: object, max_chars: int) -> str | None:
    """Why ``text`` gets no prediction (the Lambda refuses the same texts), or None."""
    if not isinstance(text, str):
        missing = pd.api.types.is_scalar(text) and pd.isna(text)  # None, NaN or NA: a null of the input
        return "the text is missing" if missing else f"the text is a {type(text).__name__}"
    if not text.strip():
        return "the text is only whitespace" if text else "the text is empty"
    if len(text) > max_chars:
        return f"the text has {len(text)} characters; the most is {max_chars}"
    return None


def prediction_fields(model: Model) -> list[pa.Field]:
    """The columns that follow the kept ones: the prediction, each label's probability, the model, the error."""
    return [
        pa.field(PREDICTED_CLASS, pa.string()),
        pa.field(CONFIDENCE, pa.float64()),
        *(pa.field(label, pa.float64()) for label in model.labels),
        pa.field(MODEL_NAME, pa.string()),
        pa.field(MODEL_VERSION, pa.int64()),
        pa.field(MANIFEST_SHA256, pa.string()),
        pa.field(ERROR, pa.string()),
    ]


def scored(frame: pd.DataFrame, model: Model, text_column: str, keep: list[str], max_chars: int) -> pd.DataFrame:
    """``frame``'s kept columns and, for each row, the Lambda's answer to its text; a row whose text the Lambda
    would refuse gets nulls and the reason in ``error``."""
    scorer = predictor(model.folder, model.manifest_sha256)
    texts = frame[text_column].tolist()
    errors = [problem(text, max_chars) for text in texts]
    good = [i for i, error in enumerate(errors) if error is None]
    results = scorer.results(np.concatenate([scorer.logits([texts[i]]) for i in good])) if good else []
    n = len(texts)
    out = frame[keep].reset_index(drop=True)
    predicted: list[str | None] = [None] * n
    confidence = np.full(n, np.nan)
    probabilities = {label: np.full(n, np.nan) for label in model.labels}
    for i, result in zip(good, results, strict=True):
        predicted[i] = result["predicted_class"]
        confidence[i] = result["confidence"]
        for label, p in result["probabilities"].items():
            probabilities[label][i] = p
    columns = {PREDICTED_CLASS: predicted, CONFIDENCE: confidence, **probabilities}
    columns |= {MODEL_NAME: [model.name] * n, MODEL_VERSION: [model.version] * n}
    columns |= {MANIFEST_SHA256: [model.manifest_sha256] * n, ERROR: errors}
    return pd.concat([out, pd.DataFrame(columns)], axis=1)


@dataclass
class Counts:
    """What a job scored: its rows, the rows with an error, and the rows of each predicted class."""

    rows: int = 0
    errors: int = 0
    classes: dict[str, int] | None = None

    def add(self, frame: pd.DataFrame) -> None:
        """Count a scored frame."""
        self.rows += len(frame)
        self.errors += int(frame[ERROR].notna().sum())
        classes = self.classes if self.classes is not None else {}
        for label, n in frame[PREDICTED_CLASS].value_counts().items():
            classes[str(label)] = classes.get(str(label), 0) + int(n)
        self.classes = classes
