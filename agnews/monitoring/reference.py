"""A version's reference profile: the served bundle's own answers on the validation split, made when the version is
trained, so that ``monitor`` compares captured answers with what the model answered on the data it was chosen on,
and never runs the model itself.

One row per validation text: the predicted class, its confidence and every class's probability, the tokens that the
model read and whether it read less than the whole text (as the Lambda captures them, through ``Predictor``), the
text's length in characters, and the text (AG News' own, for the text descriptors).
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd

from agnews.errors import DataError
from agnews.names import REFERENCE_ARTIFACT
from bundle.predictor import Predictor

PREDICTED, CONFIDENCE, TOKENS, CUT, TEXT = "predicted_class", "confidence", "tokens", "cut", "text"
TEXT_LENGTH = "text_length"
PROBABILITY = "probability."  # the prefix of each class's probability column
COLUMNS = (PREDICTED, CONFIDENCE, TOKENS, CUT)  # what a capture and the reference both hold, compared for drift


def profile(predictor: Predictor, texts: list[str]) -> pd.DataFrame:
    """The reference profile of ``texts``: the bundle's answers and readings, one row per text."""
    answers, readings = predictor.predict_read(texts)
    probabilities = {
        f"{PROBABILITY}{label}": [answer["probabilities"][label] for answer in answers] for label in predictor.labels
    }
    return pd.DataFrame(
        {
            PREDICTED: [answer["predicted_class"] for answer in answers],
            CONFIDENCE: [answer["confidence"] for answer in answers],
            **probabilities,
            TOKENS: [reading.tokens for reading in readings],
            CUT: [reading.cut for reading in readings],
            TEXT_LENGTH: [len(text) for text in texts],
            TEXT: texts,
        }
    )


def write(frame: pd.DataFrame, path: Path) -> Path:
    """The profile as parquet at ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(path, index=False)
    return path


def log_profile(predictor: Predictor, texts: list[str], workdir: Path) -> None:
    """The profile of ``texts`` (the validation split's), logged as the active run's ``REFERENCE_ARTIFACT``."""
    path = write(profile(predictor, texts), workdir / REFERENCE_ARTIFACT)
    mlflow.log_artifact(str(path), str(Path(REFERENCE_ARTIFACT).parent))


def read(path: Path) -> pd.DataFrame:
    """A profile written by ``write``; DataError for a file that is not one."""
    try:
        frame = pd.read_parquet(path)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a reference profile ({exc})") from None
    missing = [column for column in (*COLUMNS, TEXT) if column not in frame.columns]
    if missing or frame.empty:
        raise DataError(f"{path}: not a reference profile (no rows, or no {', '.join(missing)})")
    frame[PREDICTED] = frame[PREDICTED].astype("category")
    return frame
