"""The capture record: what the Lambda keeps of each answer, and how a reader parses it back.

The Lambda writes one JSON line per request on stdout (lambda/handler.py): its log fields, the fields that the
template's metric filters make CloudWatch metrics of, and, under ``captures``, one entry per text answered (a random
share of them, ``CAPTURE_RATE``). The fields that every text of a request shares are written once, at the top of the
line, and shared with the log and the metrics; so a capture record is the line's request fields joined with one
entry:

- ``time``: when the request was answered, milliseconds since the epoch (UTC);
- ``request_id``: the Lambda request id (null where there is none, as on the command line);
- ``model``, ``version``, ``manifest``: the model that answered (``champion.json``'s name, version and the sha256
  of the manifest it was verified against);
- ``ms``: milliseconds of the whole request (the ``Latency`` metric);
- per entry: ``class`` (the predicted class), ``p`` (each label's probability, rounded to ``DECIMALS``; the
  confidence is the predicted class's), ``tokens`` (the text's tokens that the model read), ``cut`` (whether the
  model read less than the whole text), ``text_sha256`` (of the text's UTF-8 bytes, so that labels given later can
  be joined to it), and ``text`` only where the Lambda was asked to keep it (``CAPTURE_TEXT=true``);
- during a rollout (``bundle.layout.Candidate``), an entry from the candidate where the line names the champion (or
  the other way round, in a batch) has its own ``version`` and ``manifest``: a canary's answer; and ``shadow: true``
  where it is the candidate's shadow run on a text that the champion answered (the champion's own entry for the
  text is in the same line).

The line writes both digests in unpadded base64url (``line_digest``: 43 characters, where hex takes 64, as CloudWatch
bills every byte); a record holds them in hex, as ``champion.json`` and a labels file do.

Lines without ``captures`` (errors, GET, a rate that kept none) are log lines only, and never reach the capture
store. The store holds the lines as Amazon Data Firehose delivers them: ``captures/<model>/YYYY/MM/DD/HH/<object>``
(UTC), each object JSON lines; ``lambda/local.py`` writes the same layout. ``parse_line`` reads one line strictly.
"""

from __future__ import annotations

import base64
import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from bundle.layout import ContractError, _field, _object, _version, sha256

CAPTURES = "captures"  # the key of the line's entries, and the store's prefix
DECIMALS = 4  # of each captured probability
PARTITION = "%Y/%m/%d/%H"  # Firehose's default time partition of a prefix, in UTC
# 32 bytes in unpadded base64url: 42 characters and a last one that holds 4 bits (its 2 low bits 0)
LINE_DIGEST = re.compile(r"[A-Za-z0-9_-]{42}[AEIMQUYcgkosw048]")


@dataclass(frozen=True)
class CaptureRecord:
    """One text answered: the request's fields and the text's entry (see the module's docstring)."""

    time: datetime
    request_id: str | None
    model_name: str
    model_version: int
    manifest_sha256: str
    predicted_class: str
    confidence: float
    probabilities: dict[str, float]
    tokens: int
    cut: bool
    latency_ms: float
    text_sha256: str
    text: str | None
    shadow: bool = False  # a rollout's shadow run on the text: the candidate's, which did not answer


def text_sha256(text: str) -> str:
    """The sha256 of a text's UTF-8 bytes, as captured."""
    return sha256(text.encode("utf-8"))


def line_digest(hex_digest: str) -> str:
    """A sha256 hex digest as the line writes it: its 32 bytes in unpadded base64url."""
    return base64.urlsafe_b64encode(bytes.fromhex(hex_digest)).rstrip(b"=").decode()


def _digest(doc: dict[str, Any], name: str, where: str) -> str:
    """The line's digest ``name`` (``line_digest``), in hex."""
    value = _field(doc, name, str, where)
    if not LINE_DIGEST.fullmatch(value):
        raise ContractError(f"{where}: {name!r} is not a sha256 digest in unpadded base64url")
    return base64.urlsafe_b64decode(value + "=").hex()


def entry(result: dict[str, Any], tokens: int, cut: bool, text: str, keep_text: bool) -> dict[str, Any]:
    """The line's entry for one text, from its answer (``Predictor.results``' dict): the text itself only if
    ``keep_text``."""
    doc = {
        "class": result["predicted_class"],
        "p": {label: round(p, DECIMALS) for label, p in result["probabilities"].items()},
        "tokens": tokens,
        "cut": cut,
        "text_sha256": line_digest(text_sha256(text)),
    }
    return doc | {"text": text} if keep_text else doc


def by_model(doc: dict[str, Any], version: int, manifest_sha256: str, shadow: bool) -> dict[str, Any]:
    """An entry from another model than the line's (a rollout's candidate): its version and manifest, and whether it
    is the candidate's shadow run on a text that the champion answered."""
    doc = doc | {"version": version, "manifest": line_digest(manifest_sha256)}
    return doc | {"shadow": True} if shadow else doc


def object_prefix(model_name: str, when: datetime) -> str:
    """The store's prefix for the objects of ``when`` (UTC): ``captures/<model>/YYYY/MM/DD/HH/``."""
    return f"{CAPTURES}/{model_name}/{when.astimezone(UTC).strftime(PARTITION)}/"


def _record(line: dict[str, Any], time: datetime, item: object, where: str) -> CaptureRecord:
    if not isinstance(item, dict):
        raise ContractError(f"{where} is not a JSON object")
    probabilities = _field(item, "p", dict, where)
    if not probabilities:
        raise ContractError(f"{where}: 'p' is empty")
    for label in probabilities:
        probability = _field(probabilities, label, (int, float), f"{where} p")
        if not 0 <= probability <= 1:  # NaN too
            raise ContractError(f"{where}: the probability of {label!r} is not in [0, 1]")
    predicted = _field(item, "class", str, where)
    if predicted not in probabilities:
        raise ContractError(f"{where}: 'class' {predicted!r} is not among the labels of 'p'")
    tokens = _field(item, "tokens", int, where)
    if tokens < 0:
        raise ContractError(f"{where}: 'tokens' is negative")
    digest = _digest(item, "text_sha256", where)
    text = _field(item, "text", str, where) if "text" in item else None
    if text is not None and text_sha256(text) != digest:
        raise ContractError(f"{where}: 'text_sha256' is not the sha256 of 'text'")
    request_id = line.get("request_id")
    if request_id is not None and not isinstance(request_id, str):
        raise ContractError(f"{where}: 'request_id' is {type(request_id).__name__}")
    latency = _field(line, "ms", (int, float), where)
    if not math.isfinite(latency) or latency < 0:
        raise ContractError(f"{where}: 'ms' {latency} is not a duration")
    model = item if "version" in item else line  # an entry from another model than the line's names it
    shadow = _field(item, "shadow", bool, where) if "shadow" in item else False
    if shadow and model is line:
        raise ContractError(f"{where}: a 'shadow' entry names no 'version' of its own")
    return CaptureRecord(
        time=time,
        request_id=request_id,
        model_name=_field(line, "model", str, where),
        model_version=_version(model, where),
        manifest_sha256=_digest(model, "manifest", where),
        predicted_class=predicted,
        confidence=float(probabilities[predicted]),
        probabilities={label: float(p) for label, p in probabilities.items()},
        tokens=tokens,
        cut=_field(item, "cut", bool, where),
        latency_ms=float(latency),
        text_sha256=digest,
        text=text,
        shadow=shadow,
    )


def parse_line(data: str | bytes, where: str = "capture line") -> list[CaptureRecord]:
    """The capture records of one line (none for a log line without ``captures``); a line that breaks the schema
    raises ContractError naming the field."""
    line = _object(data.encode("utf-8") if isinstance(data, str) else data, where)
    if CAPTURES not in line:
        return []
    entries = _field(line, CAPTURES, list, where)
    stamp = _field(line, "time", int, where)
    try:
        time = datetime.fromtimestamp(stamp / 1000, UTC) if stamp >= 0 else None
    except (OverflowError, OSError, ValueError):  # beyond what a datetime holds
        time = None
    if time is None:
        raise ContractError(f"{where}: 'time' {stamp} is not milliseconds since the epoch")
    return [_record(line, time, item, f"{where} {CAPTURES}[{i}]") for i, item in enumerate(entries)]


def parse_lines(data: str | bytes, where: str = "capture object") -> list[CaptureRecord]:
    """The capture records of an object of JSON lines (blank lines skipped)."""
    text = data.decode("utf-8") if isinstance(data, bytes) else data
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            records.extend(parse_line(line, f"{where} line {number}"))
    return records
