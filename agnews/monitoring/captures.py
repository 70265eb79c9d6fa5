"""The captured answers of a window, read from storage where the Lambda's Firehose stream and ``lambda/local.py``
put them: ``captures/<model>/YYYY/MM/DD/HH/<object>`` (bundle/capture.py parses each line).

The answers are read one object at a time and kept as columns of machine numbers (``Answers``), about 50 bytes an
answer, so that a busy day (a million answers) fits in a few hundred MB; captured texts are kept only as a uniform
sample per version, for the text descriptors.
"""

from __future__ import annotations

import io
import random
import re
from array import array
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import numpy as np
import pandas as pd

from agnews.monitoring.reference import CONFIDENCE, CUT, PREDICTED, TOKENS
from agnews.settings import MonitorSettings
from agnews.storage import Storage
from bundle.capture import CaptureRecord, object_prefix, parse_line
from bundle.layout import ContractError

UNITS = {"m": timedelta(minutes=1), "h": timedelta(hours=1), "d": timedelta(days=1)}
HOUR = timedelta(hours=1)
DIGEST_BYTES = 32


def utc(text: str) -> datetime:
    """An ISO 8601 time, UTC when it names no zone."""
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@dataclass(frozen=True)
class Window:
    """The answers read: from ``since`` (included) to ``until`` (excluded)."""

    since: datetime
    until: datetime

    def hours(self) -> list[datetime]:
        """The start of each hour that the window touches: one storage partition each."""
        hour = self.since.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
        hours = []
        while hour < self.until:
            hours.append(hour)
            hour += HOUR
        return hours

    def __str__(self) -> str:
        return f"{self.since.isoformat()} to {self.until.isoformat()}"


def window(settings: MonitorSettings, now: datetime) -> Window:
    """The window of ``monitor.since``, ``monitor.until`` and ``monitor.window``; ``until`` defaults to ``now``."""
    until = utc(settings.until) if settings.until else now
    count, unit = re.fullmatch(r"(\d+)([mhd])", settings.window).groups()  # type: ignore[union-attr]
    since = utc(settings.since) if settings.since else until - int(count) * UNITS[unit]
    return Window(since, until)


@dataclass
class BadLines:
    """Capture lines that did not parse: how many, and the first few with the reason."""

    keep: int
    count: int = 0
    samples: list[str] = field(default_factory=list)

    def add(self, reason: str, line: bytes) -> None:
        self.count += 1
        if len(self.samples) < self.keep:
            self.samples.append(f"{reason}\n  {line[:300].decode('utf-8', 'replace')}")


class Answers:
    """The window's answers, one entry per text answered, as columns; captured texts as a uniform sample of at most
    ``text_sample`` per version (reservoir sampling, seeded). A rollout's shadow answers (the candidate's run on a
    text that the champion answered) are entries of the candidate's version, marked ``shadow``; each entry keeps its
    request's latency and a key of its request and text, which pairs a shadow answer with the champion's."""

    def __init__(self, text_sample: int, seed: int) -> None:
        self.classes: dict[str, int] = {}
        self.version = array("i")
        self.predicted = array("B")
        self.confidence = array("f")
        self.tokens = array("i")
        self.cut = array("B")
        self.digests = bytearray()
        self.shadow = array("B")
        self.latency = array("f")
        self.requests = array("q")  # the request id's hash (this process's), paired with the text in ``pair_keys``
        self.text_sample = text_sample
        self.texts: dict[int, list[str]] = {}
        self.texts_seen: dict[int, int] = {}
        self.random = random.Random(seed)

    def __len__(self) -> int:
        return len(self.version)

    def add(self, record: CaptureRecord) -> None:
        self.version.append(record.model_version)
        self.predicted.append(self.classes.setdefault(record.predicted_class, len(self.classes)))
        self.confidence.append(record.confidence)
        self.tokens.append(record.tokens)
        self.cut.append(record.cut)
        self.digests += bytes.fromhex(record.text_sha256)
        self.shadow.append(record.shadow)
        self.latency.append(record.latency_ms)
        self.requests.append(hash(record.request_id))
        if record.text is not None:
            self._keep_text(record.model_version, record.text)

    def _keep_text(self, version: int, text: str) -> None:
        sample = self.texts.setdefault(version, [])
        seen = self.texts_seen.get(version, 0)
        self.texts_seen[version] = seen + 1
        if len(sample) < self.text_sample:
            sample.append(text)
        elif (slot := self.random.randrange(seen + 1)) < self.text_sample:
            sample[slot] = text

    def counts(self) -> dict[int, int]:
        """Answers per version, by version."""
        versions, counts = np.unique(np.frombuffer(self.version, dtype=np.int32), return_counts=True)
        return {int(v): int(c) for v, c in zip(versions, counts, strict=True)}

    def rows(self, version: int, shadow: bool | None = None) -> np.ndarray:
        """The positions of ``version``'s answers; only its shadow answers, or only the others, if ``shadow`` says."""
        mine = np.frombuffer(self.version, dtype=np.int32) == version
        if shadow is not None:
            mine &= np.frombuffer(self.shadow, dtype=np.uint8) == shadow
        return np.flatnonzero(mine)

    def pair_keys(self, rows: np.ndarray) -> np.ndarray:
        """A 64-bit key of the request and the text of each answer at ``rows``: the same for the champion's answer
        and the shadow's of one text in one request."""
        texts = np.frombuffer(self.digests, dtype=np.uint64).reshape(-1, DIGEST_BYTES // 8)[rows, 0]
        return texts ^ np.frombuffer(self.requests, dtype=np.uint64)[rows]

    def latencies(self, rows: np.ndarray) -> np.ndarray:
        """The latency in milliseconds of the request of each answer at ``rows``."""
        return np.frombuffer(self.latency, dtype=np.float32)[rows]

    def codes(self, rows: np.ndarray) -> np.ndarray:
        """The class answered at ``rows``, as the index of its name in ``classes``."""
        return np.frombuffer(self.predicted, dtype=np.uint8)[rows]

    def frame(self, version: int) -> pd.DataFrame:
        """``version``'s answers as the reference's columns (``reference.COLUMNS``)."""
        rows = self.rows(version)
        names = list(self.classes)
        return pd.DataFrame(
            {
                PREDICTED: pd.Categorical.from_codes(self.codes(rows), names),
                CONFIDENCE: np.frombuffer(self.confidence, dtype=np.float32)[rows].astype(np.float64),
                TOKENS: np.frombuffer(self.tokens, dtype=np.int32)[rows],
                CUT: np.frombuffer(self.cut, dtype=np.uint8)[rows].astype(bool),
            }
        )

    def digest(self, row: int) -> bytes:
        """The text sha256 of the answer at ``row``, as bytes."""
        return bytes(self.digests[row * DIGEST_BYTES : (row + 1) * DIGEST_BYTES])

    def predicted_class(self, rows: np.ndarray) -> np.ndarray:
        """The classes answered at ``rows``."""
        return np.array(list(self.classes), dtype=object)[self.codes(rows)]


@dataclass
class Read:
    """What reading a window found: the answers, the objects read, and the lines that did not parse."""

    answers: Answers
    objects: int
    bad: BadLines


def read_window(storage: Storage, model_name: str, span: Window, settings: MonitorSettings, seed: int) -> Read:
    """The answers of ``model_name`` captured in ``span``: each hour's partition listed, each object read and parsed
    line by line; a line that does not parse is counted and skipped."""
    answers = Answers(settings.text_sample, seed)
    bad = BadLines(settings.bad_line_samples)
    listed = [key for hour in span.hours() for key in storage.list(object_prefix(model_name, hour))]
    keys = [key for key in listed if not key.rpartition("/")[2].startswith(".")]  # not a local write under way
    for key in keys:
        for number, line in enumerate(io.BytesIO(storage.read_bytes(key)), 1):
            if not line.strip():
                continue
            try:
                records = parse_line(line, f"{key} line {number}")
            except ContractError as exc:
                bad.add(str(exc), line)
                continue
            for record in records:
                if span.since <= record.time < span.until:
                    answers.add(record)
    return Read(answers, len(keys), bad)
