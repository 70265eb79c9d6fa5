"""Live accuracy: labels that arrive after the answers (users' corrections, a labelled sample), joined to the
captured answers by the text's sha256.

A labels file is JSON lines or CSV (by its extension: ``.csv``; anything else is read as JSON lines), local or
``s3://``, with a ``text_sha256`` and a ``label`` (a class name) per row; a hash that appears twice keeps its last
label. Each captured answer of a labelled text counts once.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pandas as pd
from botocore.exceptions import BotoCoreError, ClientError
from statsmodels.stats.proportion import proportion_confint

from agnews.errors import DataError, StorageError
from agnews.monitoring.captures import Answers
from agnews.storage import s3_client
from bundle.layout import SHA256

DIGEST, LABEL = "text_sha256", "label"


@dataclass(frozen=True)
class Labels:
    """The labels by text sha256 (as bytes), and how many rows the file had."""

    by_digest: dict[bytes, str]
    rows: int


@dataclass(frozen=True)
class Live:
    """A version's live accuracy on its labelled answers, with its confidence interval."""

    labelled: int
    accuracy: float
    low: float
    high: float


def _read(uri: str) -> bytes:
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        try:
            return s3_client().get_object(Bucket=parsed.netloc, Key=parsed.path.lstrip("/"))["Body"].read()
        except (ClientError, BotoCoreError) as exc:
            raise StorageError(f"cannot read monitor.labels {uri}: {exc}") from None
    try:
        return Path(parsed.path if parsed.scheme == "file" else uri).read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read monitor.labels {uri}: {exc.strerror}") from None


def read_labels(uri: str) -> Labels:
    """The labels file at ``uri``; DataError for one without ``text_sha256`` and ``label``, or with a hash that is not
    a sha256 hex digest."""
    data = io.BytesIO(_read(uri))
    try:
        frame = (
            pd.read_csv(data, dtype=str)
            if uri.lower().endswith(".csv")
            else pd.read_json(data, lines=True, dtype={DIGEST: str, LABEL: str})
        )
    except ValueError as exc:
        raise DataError(f"monitor.labels {uri}: not CSV or JSON lines ({exc})") from None
    missing = [column for column in (DIGEST, LABEL) if column not in frame.columns]
    if missing:
        raise DataError(f"monitor.labels {uri}: no {' or '.join(missing)} column")
    digests = frame[DIGEST].astype(str).str.lower()
    bad = ~digests.str.fullmatch(SHA256.pattern)
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise DataError(f"monitor.labels {uri}: row {row + 1}: {frame[DIGEST].iloc[row]!r} is not a sha256 hex digest")
    by_digest = {bytes.fromhex(d): str(label) for d, label in zip(digests, frame[LABEL], strict=True)}
    return Labels(by_digest, len(frame))


def labelled(answers: Answers, labels: Labels, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Of the answers at ``rows``: which have a label, and that label (None where there is none)."""
    found = np.array([labels.by_digest.get(answers.digest(int(row))) for row in rows], dtype=object)
    return found != None, found  # noqa: E711  (element-wise)


def live_accuracy(answers: Answers, labels: Labels, rows: np.ndarray, confidence_level: float) -> Live | None:
    """The accuracy of the answers at ``rows`` that have a label, with Wilson's interval at ``confidence_level``;
    None when none has."""
    has, label = labelled(answers, labels, rows)
    count = int(has.sum())
    if not count:
        return None
    right = int((answers.predicted_class(rows[has]) == label[has]).sum())
    low, high = proportion_confint(right, count, alpha=1 - confidence_level, method="wilson")
    return Live(count, right / count, float(low), float(high))


def matched(answers: Answers, labels: Labels) -> int:
    """How many of the labels' hashes are among the window's answers."""
    return len({digest for row in range(len(answers)) if (digest := answers.digest(row)) in labels.by_digest})
