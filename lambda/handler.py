"""AWS Lambda entry point: classify news text with the champion ONNX int8 model (no torch, no transformers).

Events: a direct invoke ``{"text": "..."}`` or ``{"texts": [...]}``, and API Gateway REST (v1), HTTP API (v2)
and Function URL events (events.py reads them). POST classifies; GET tells which model answers. Configuration:
environment variables, see settings.py. Locally: ``python lambda/handler.py "some text"``.

``Service`` is the adapter: events in, responses out, over any ``Store``. ``lambda_handler`` is a ``Service`` over
the container's ``ModelStore``, built from the environment on first use; until then this module imports the
standard library, settings, events and ``bundle.capture`` only (no onnxruntime, numpy, tokenizers or boto3).

Each request writes one JSON line on stdout, where Lambda sends it to CloudWatch Logs (``request_lines``): the log
fields (time, request id, status, the model that answered), the fields that the template's metric filters on the
function's log group make CloudWatch metrics of (``Latency``, ``Texts``, ``4XXError``, ``5XXError``, ``ModelSwaps``
under the dimension ``service``, and ``Predictions`` by ``predicted_class``), and the capture records of the texts
answered (bundle/capture.py), which the template's subscription filter sends on to the model bucket. A metric filter
takes one value per dimension from a line, so a batch whose texts fall into several classes adds one short line of
``predictions`` per further class. The metrics are not in CloudWatch's embedded metric format: its directives (the
namespace, names, units and dimensions, again in every line) were about 390 bytes of each, where CloudWatch bills
every byte ingested and a metric filter costs nothing. The line is written here, not by Powertools' Logger and
Metrics: theirs were three lines a request (the log, the metrics, the predictions), with fields that a capture line
repeats (location, timestamps, the request id twice), about 800 bytes before any record. Lambda reads a line without
``level`` as INFO: only WARN (a 503) and ERROR (a 500) are written. Other logs (a model's load, errors) are JSON
lines of ``logging`` (``JsonFormatter``).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import math
import os
import random
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from events import BadRequest, HttpEvent, http_event, http_method, parse_texts
from settings import LOGGER, NoModelError, Settings, SettingsError
from snapshot_restore_py import register_after_restore, register_before_snapshot

from bundle.capture import CAPTURES, by_model, entry, line_digest, text_sha256

if TYPE_CHECKING:
    from model_store import ModelStore

    from bundle.layout import Candidate
    from bundle.predictor import Reading

JSON_HEADERS = {"Content-Type": "application/json"}
ALLOWED_METHODS = ("GET", "POST")
SERVICE = LOGGER  # the metrics' "service" dimension
LEVELS = {500: "ERROR", 503: "WARN"}  # a request's log level by status; INFO (no "level": Lambda's default) otherwise
# Lambda's level names (its log-level filtering knows WARN, not Python's WARNING)
LAMBDA_LEVELS = {"WARNING": "WARN", "CRITICAL": "FATAL"}
_request = threading.local()  # the request id of the request a thread answers, for the other log lines


def compact(doc: dict[str, Any]) -> str:
    """``doc`` as one line of JSON, without spaces (CloudWatch bills every byte); what JSON cannot hold as a string."""
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=False, default=str)


class JsonFormatter(logging.Formatter):
    """A log record as one JSON line: level, message, the request id of the request being answered, the record's
    extra fields, and the exception's traceback as one string."""

    BUILT_IN = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        level = LAMBDA_LEVELS.get(record.levelname, record.levelname)
        doc: dict[str, Any] = {"level": level, "message": record.getMessage()}
        doc["request_id"] = getattr(_request, "id", None)
        doc |= {key: value for key, value in vars(record).items() if key not in self.BUILT_IN}
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return compact(doc)


class StdoutHandler(logging.StreamHandler):
    """A handler that writes to ``sys.stdout`` as it is when it writes: the Lambda runtime's, or the command line's
    stderr (``main`` sends logs and metrics there, to keep stdout for the answer)."""

    @property
    def stream(self) -> Any:
        return sys.stdout

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


# model_store.py logs through the same logger (logging.getLogger(LOGGER)).
logger = logging.getLogger(LOGGER)
if not logger.handlers:
    _handler = StdoutHandler()
    _handler.setFormatter(JsonFormatter())
    logger.addHandler(_handler)
    logger.setLevel(os.environ.get("LOG_LEVEL") or "INFO")
    # In Lambda, the runtime's own handler on the root logger would write each record a second time, as text.
    logger.propagate = not os.environ.get("AWS_LAMBDA_FUNCTION_NAME")


class Classifier(Protocol):
    """What the handler asks of a model: its labels, and for each text its answer and what the model read."""

    @property
    def labels(self) -> list[str]: ...
    def predict_read(self, texts: list[str]) -> tuple[list[dict[str, Any]], list[Reading]]: ...


class Model(Protocol):
    """The model that answers a request: champion.json's name and version, and the manifest it was checked against."""

    @property
    def model_name(self) -> str: ...
    @property
    def version(self) -> int: ...
    @property
    def manifest_sha256(self) -> str: ...
    @property
    def predictor(self) -> Classifier: ...


class Rollout(Protocol):
    """A rollout's candidate, served beside the champion: how it meets traffic, and its model."""

    @property
    def candidate(self) -> Candidate: ...
    @property
    def model(self) -> Model: ...


class Store(Protocol):
    """Where the handler gets its limits, its model and a rollout's candidate. ``settings`` may raise SettingsError
    (a 500), ``get()`` NoModelError (a 503); ``rollout()`` is None outside a rollout."""

    @property
    def settings(self) -> Settings: ...
    def get(self) -> Model: ...
    def rollout(self) -> Rollout | None: ...


_store_lock = threading.Lock()


@functools.cache
def _build_store() -> ModelStore:
    from model_store import ModelStore  # onnxruntime, numpy and tokenizers: only with the real store

    return ModelStore(Settings.from_env())


def model_store() -> ModelStore:
    """The container's one store, built on first use; a bad setting raises SettingsError, and is retried next call.
    One store even when the first requests come at once (lambda/local.py's threads)."""
    with _store_lock:
        return _build_store()


class ContainerStore:
    """The ``Store`` that ``lambda_handler`` serves from: ``model_store()``, built when first asked for."""

    @property
    def settings(self) -> Settings:
        return model_store().settings

    def get(self) -> Model:
        return model_store().get()

    def rollout(self) -> Rollout | None:
        return model_store().rollout()


@dataclass
class Outcome:
    """What the request's line says of it, beyond its status."""

    model: Model | None = None  # the model that answered (the first text, where a canary answered some of a batch)
    swapped: bool = False  # a different champion from the one that answered the request before
    shadow_ms: float | None = None  # the candidate's shadow run, in shadow mode
    texts: int = 0
    predicted: Counter[str] = field(default_factory=Counter)
    captures: list[dict[str, Any]] = field(default_factory=list)
    problem: str | None = None  # for the log: the 400's message, or the 503's details (never in its body)


def request_lines(status: int, latency_ms: float, outcome: Outcome, request_id: str | None, time_ms: int) -> list[str]:
    """The request's line (see the module's docstring), and a ``predictions`` line for each class after the first.
    The field names are short, as CloudWatch bills every byte, and the digests are in base64url (``line_digest``):
    ``ms`` is the latency, ``err4xx`` and ``err5xx`` are 1 or 0, ``swaps`` is there when a new version answered; the
    template's metric filters name them."""
    line: dict[str, Any] = {"level": LEVELS[status]} if status in LEVELS else {}
    line |= {"time": time_ms, "request_id": request_id, "status": status}
    if outcome.model is not None:
        model = outcome.model
        line |= {"model": model.model_name, "version": model.version, "manifest": line_digest(model.manifest_sha256)}
    if outcome.problem is not None:
        line["problem"] = outcome.problem
    line |= {"service": SERVICE, "ms": round(latency_ms, 3), "texts": outcome.texts}
    line |= {"err4xx": int(400 <= status < 500), "err5xx": int(status >= 500)}
    if outcome.swapped:
        line["swaps"] = 1
    if outcome.shadow_ms is not None:
        line["shadow_ms"] = round(outcome.shadow_ms, 3)
    classes = [{"class": label, "predictions": count} for label, count in sorted(outcome.predicted.items())]
    if classes:
        line |= classes[0]
    if outcome.captures:
        line[CAPTURES] = outcome.captures
    return [compact(doc) for doc in (line, *classes[1:])]


CaptureSink = Callable[[str, str], None]  # (model name, line): where lambda/local.py stores capture lines


def _why(exc: Exception) -> tuple[str, Exception]:
    return type(exc).__name__, exc


@dataclass(frozen=True)
class Answer:
    """One text's answer: the model that gave it, its prediction and what the model read."""

    model: Model
    prediction: dict[str, Any]
    reading: Reading

    @staticmethod
    def fill(answers: dict[int, Answer], positions: list[int], texts: list[str], model: Model) -> None:
        """Answer the texts at ``positions`` with ``model``, in one call."""
        if not positions:
            return
        predictions, readings = model.predictor.predict_read([texts[i] for i in positions])
        for i, prediction, reading in zip(positions, predictions, readings, strict=True):
            answers[i] = Answer(model, prediction, reading)

    def entry(self, text: str, keep_text: bool, line_model: Model | None, shadow: bool) -> dict[str, Any]:
        """The capture entry: with its own version and manifest where its model is not the line's."""
        doc = entry(self.prediction, self.reading.tokens, self.reading.cut, text, keep_text)
        if self.model is line_model and not shadow:
            return doc
        return by_model(doc, self.model.version, self.model.manifest_sha256, shadow)


class Service:
    """The handler over ``store``: answers every event with a response, and never raises. Each answer writes its
    line (``request_lines``); a line with capture records also goes to ``capture_sink`` where one is set (locally;
    in AWS the log group's subscription filter takes them from stdout)."""

    def __init__(self, store: Store, capture_sink: CaptureSink | None = None) -> None:
        self.store = store
        self.capture_sink = capture_sink
        self._served: int | None = None  # the version that answered last

    def _model(self, outcome: Outcome) -> Model:
        model = self.store.get()
        outcome.model = model
        outcome.swapped = self._served not in (None, model.version)
        self._served = model.version
        return model

    def _answer(self, event: object, http: HttpEvent | None, outcome: Outcome) -> tuple[int, Any]:
        """Status code and body for one event."""
        try:
            settings = self.store.settings  # a configuration error comes first, whatever the event
            method = None if http is None else http_method(http)
            if method == "GET":
                model = self._model(outcome)
                return 200, {"model_version": model.version, "labels": model.predictor.labels}
            if method is not None and method not in ALLOWED_METHODS:
                error = "method not allowed: POST a JSON object to classify, GET to see the model version"
                return 405, {"error": error}
            texts, single = parse_texts(event, http, settings)
            results = self._predict(texts, self._model(outcome), self.store.rollout(), settings, outcome)
            return 200, results[0] if single else results
        except BadRequest as exc:
            outcome.problem = str(exc)
            return 400, {"error": str(exc)}
        except NoModelError as exc:
            outcome.problem = exc.detail
            return 503, {"error": f"no model available: {exc.reason}"}
        except SettingsError as exc:
            outcome.problem = str(exc)
            return 500, {"error": f"configuration error: {exc}"}

    @staticmethod
    def _predict(
        texts: list[str], champion: Model, rollout: Rollout | None, settings: Settings, outcome: Outcome
    ) -> list[dict[str, Any]]:
        """The answers to ``texts``, each naming the version that gave it: the champion's, or a canary's for the
        texts it draws (``Candidate.answers``); a shadow runs on every text after the champion answered. A candidate
        that fails costs no answer: the champion answers, and one log line says why."""
        by_position: dict[int, Answer] = {}
        if rollout is not None and rollout.candidate.mode == "canary":
            drawn = [i for i, text in enumerate(texts) if rollout.candidate.answers(text_sha256(text))]
            try:
                Answer.fill(by_position, drawn, texts, rollout.model)
            except Exception as exc:  # the champion answers instead
                by_position.clear()
                logger.error("candidate v%s failed, the champion answered: %s: %s", rollout.model.version, *_why(exc))
        Answer.fill(by_position, [i for i in range(len(texts)) if i not in by_position], texts, champion)
        answered = [by_position[i] for i in range(len(texts))]
        shadow: dict[int, Answer] = {}
        if rollout is not None and rollout.candidate.mode == "shadow":
            started = time.perf_counter()
            try:
                Answer.fill(shadow, list(range(len(texts))), texts, rollout.model)
            except Exception as exc:  # the answers stand; the shadow's records are left out
                shadow.clear()
                logger.error("shadow v%s failed: %s: %s", rollout.model.version, *_why(exc))
            outcome.shadow_ms = (time.perf_counter() - started) * 1000
        outcome.model, outcome.texts = answered[0].model, len(texts)
        outcome.predicted.update(answer.prediction["predicted_class"] for answer in answered)
        Service._capture(texts, answered, shadow, settings, outcome)
        return [answer.prediction | {"model_version": answer.model.version} for answer in answered]

    @staticmethod
    def _capture(
        texts: list[str], answered: list[Answer], shadow: dict[int, Answer], settings: Settings, outcome: Outcome
    ) -> None:
        """The capture records of a random share (``CAPTURE_RATE``) of the texts (with the shadow's run on each text
        kept); a failure leaves the answers as they are and logs one line."""
        try:
            for i, (text, answer) in enumerate(zip(texts, answered, strict=True)):
                if settings.capture_rate < 1 and random.random() >= settings.capture_rate:
                    continue
                outcome.captures.append(answer.entry(text, settings.capture_text, outcome.model, shadow=False))
                if i in shadow:
                    outcome.captures.append(shadow[i].entry(text, settings.capture_text, outcome.model, shadow=True))
        except Exception as exc:  # a record is never worth an answer
            outcome.captures = []
            logger.error("capture failed: %s: %s", *_why(exc))

    def handle(self, event: Any, context: Any) -> dict[str, Any]:
        """The response to one Lambda event: a proxy response for an HTTP event, else statusCode and body."""
        started = time.perf_counter()
        request_id = getattr(context, "aws_request_id", None)
        _request.id = request_id
        http = http_event(event)
        outcome = Outcome()
        try:
            status, body = self._answer(event, http, outcome)
        except Exception:  # the last guard: a bug must still give a response, not a crashed invocation
            logger.exception("unexpected error")
            status, body = 500, {"error": "internal error"}
        self.write(status, (time.perf_counter() - started) * 1000, outcome, request_id)
        _request.id = None
        if http is None:
            return {"statusCode": status, "body": body}
        headers = JSON_HEADERS | ({"Allow": ", ".join(ALLOWED_METHODS)} if status == 405 else {})
        return {"statusCode": status, "headers": headers, "body": json.dumps(body), "isBase64Encoded": False}

    def write(self, status: int, latency_ms: float, outcome: Outcome, request_id: str | None) -> None:
        """The request's line on stdout, and to the capture sink where it holds records."""
        lines = request_lines(status, latency_ms, outcome, request_id, math.floor(time.time() * 1000))
        sys.stdout.write("".join(line + "\n" for line in lines))
        if outcome.captures and outcome.model is not None and self.capture_sink is not None:
            try:
                self.capture_sink(outcome.model.model_name, lines[0])
            except Exception as exc:  # locally, a store that can't be written never fails an answer
                logger.error("capture not written: %s: %s", type(exc).__name__, exc)


service = Service(ContainerStore())


def lambda_handler(event: Any, context: Any) -> dict[str, Any]:
    """The Lambda handler: never raises, whatever the event."""
    return service.handle(event, context)


def main(argv: list[str] | None = None) -> int:
    """Classify the texts given as arguments, configured by the same environment variables as the Lambda."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("texts", nargs="+", help="one text, or several for a batch")
    args = parser.parse_args(argv)
    event = {"text": args.texts[0]} if len(args.texts) == 1 else {"texts": args.texts}
    with contextlib.redirect_stdout(sys.stderr):  # the JSON logs and metrics; stdout gets the answer alone
        response = lambda_handler(event, None)
    print(json.dumps(response["body"], indent=2, ensure_ascii=False))
    return 0 if response["statusCode"] == 200 else 1


@register_before_snapshot
def load_before_snapshot() -> None:
    """SnapStart, before the snapshot of a published version: the champion loaded and run once, so that an instance
    restored from the snapshot answers at once."""
    with contextlib.suppress(SettingsError):
        model_store().refresh()


@register_after_restore
def recheck_after_restore() -> None:
    """SnapStart, after a restore: every instance restored from one snapshot would draw the same random numbers, so
    ``random`` is re-seeded (from the OS); and the snapshot may be hours old, so ``champion.json`` is read again now,
    not when the refresh interval ends."""
    random.seed()
    with contextlib.suppress(SettingsError):
        model_store().recheck()


# In Lambda, load the model during the init phase, which runs at full CPU, rather than in the first request (with
# SnapStart, the init phase runs when a version is published, before the snapshot).
if os.environ.get("AWS_LAMBDA_FUNCTION_NAME"):
    load_before_snapshot()

if __name__ == "__main__":
    sys.exit(main())
