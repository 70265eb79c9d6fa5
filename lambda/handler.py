"""AWS Lambda entry point: classify news text with the champion ONNX int8 model (no torch, no transformers).

Events: a direct invoke ``{"text": "..."}`` or ``{"texts": [...]}``, and API Gateway REST (v1), HTTP API (v2)
and Function URL events (events.py reads them). POST classifies; GET tells which model answers. Configuration:
environment variables, see settings.py. Locally: ``python lambda/handler.py "some text"``.

``Service`` is the adapter: events in, responses out, over any ``Store``. ``lambda_handler`` is a ``Service`` over
the container's ``ModelStore``, built from the environment on first use; until then this module imports the
standard library, settings, events and Powertools only (no onnxruntime, numpy or tokenizers).

Observability is Powertools for AWS Lambda's: one JSON log line per request (and per model load), with the request
id and the model version, and CloudWatch metrics in the embedded metric format (EMF), printed to stdout, where
Lambda sends them to CloudWatch Logs and CloudWatch extracts them: ``Latency``, ``Texts``, ``Predictions`` by
``predicted_class``, ``4XXError``, ``5XXError`` and ``ModelSwaps``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import random
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.metrics import MetricUnit, single_metric
from aws_lambda_powertools.utilities.data_classes.common import BaseProxyEvent
from events import BadRequest, http_event, http_method, parse_texts
from settings import LOGGER, NoModelError, Settings, SettingsError
from snapshot_restore_py import register_after_restore, register_before_snapshot

if TYPE_CHECKING:
    from model_store import ModelStore

JSON_HEADERS = {"Content-Type": "application/json"}
ALLOWED_METHODS = ("GET", "POST")
METRICS_NAMESPACE = "agnews"  # POWERTOOLS_METRICS_NAMESPACE overrides it


class StdoutHandler(logging.StreamHandler):
    """A handler that writes to ``sys.stdout`` as it is when it writes: the Lambda runtime's, or the command line's
    stderr (``main`` sends logs and metrics there, to keep stdout for the answer)."""

    @property
    def stream(self) -> Any:
        return sys.stdout

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


# model_store.py logs through the same logger (logging.getLogger(LOGGER)): its lines are JSON too, with the request's
# keys (Service.handle).
logger = Logger(service=LOGGER, logger_handler=StdoutHandler())
metrics = Metrics(namespace=os.environ.get("POWERTOOLS_METRICS_NAMESPACE") or METRICS_NAMESPACE, service=LOGGER)


class Classifier(Protocol):
    """What the handler asks of a model: its labels, and one result dict per text."""

    @property
    def labels(self) -> list[str]: ...
    def predict(self, texts: list[str]) -> list[dict[str, Any]]: ...


class Model(Protocol):
    """The model that answers a request."""

    @property
    def version(self) -> int: ...
    @property
    def predictor(self) -> Classifier: ...


class Store(Protocol):
    """Where the handler gets its limits and its model. ``settings`` may raise SettingsError (a 500), ``get()``
    NoModelError (a 503)."""

    @property
    def settings(self) -> Settings: ...
    def get(self) -> Model: ...


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


@dataclass
class Outcome:
    """What the log and the metrics say of one request, beyond its status."""

    version: int | None = None  # the model that answered
    swapped: bool = False  # a different version from the one that answered the request before
    texts: int = 0
    predicted: Counter[str] = field(default_factory=Counter)
    problem: str | None = None  # for the log: the 400's message, or the 503's details (never in its body)


class Service:
    """The handler over ``store``: answers every event with a response, and never raises. Each answer is logged (one
    JSON line) and measured (EMF metrics), see the module's docstring."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._served: int | None = None  # the version that answered last
        self._metrics_lock = threading.Lock()  # Powertools' metric set is one per process; local.py uses threads

    def _model(self, outcome: Outcome) -> Model:
        model = self.store.get()
        outcome.version = model.version
        outcome.swapped = self._served not in (None, model.version)
        self._served = model.version
        logger.thread_safe_append_keys(model_version=model.version)
        return model

    def _answer(self, event: object, http: BaseProxyEvent | None, outcome: Outcome) -> tuple[int, Any]:
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
            model = self._model(outcome)
            predictions = model.predictor.predict(texts)
            outcome.texts = len(texts)
            outcome.predicted.update(prediction["predicted_class"] for prediction in predictions)
            results = [prediction | {"model_version": model.version} for prediction in predictions]
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

    def handle(self, event: Any, context: Any) -> dict[str, Any]:
        """The response to one Lambda event: a proxy response for an HTTP event, else statusCode and body."""
        started = time.perf_counter()
        # Keys of this thread only (thread_safe_*), not Logger.inject_lambda_context's process-wide ones: local.py
        # answers on several threads at once.
        logger.thread_safe_clear_keys()
        request_id = getattr(context, "aws_request_id", None)
        if request_id is not None:
            logger.thread_safe_append_keys(function_request_id=request_id)
        http = http_event(event)
        outcome = Outcome()
        try:
            status, body = self._answer(event, http, outcome)
        except Exception:  # the last guard: a bug must still give a response, not a crashed invocation
            logger.exception("unexpected error")
            status, body = 500, {"error": "internal error"}
        self._record(status, (time.perf_counter() - started) * 1000, outcome, request_id)
        if http is None:
            return {"statusCode": status, "body": body}
        headers = JSON_HEADERS | ({"Allow": ", ".join(ALLOWED_METHODS)} if status == 405 else {})
        return {"statusCode": status, "headers": headers, "body": json.dumps(body), "isBase64Encoded": False}

    def _record(self, status: int, latency_ms: float, outcome: Outcome, request_id: str | None) -> None:
        """The request's log line, and its metrics."""
        self.log_line(status, latency_ms, outcome)
        self.measure(status, latency_ms, outcome, request_id)

    def log_line(self, status: int, latency_ms: float, outcome: Outcome) -> None:
        """The request's JSON log line."""
        fields: dict[str, Any] = {"status": status, "texts": outcome.texts, "latency_ms": round(latency_ms, 3)}
        if outcome.problem is not None:
            fields["problem"] = outcome.problem
        write = logger.error if status == 500 else logger.warning if status == 503 else logger.info
        write("answered", extra=fields)

    def measure(self, status: int, latency_ms: float, outcome: Outcome, request_id: str | None) -> None:
        """The request's metrics, printed in EMF."""
        with self._metrics_lock:
            metrics.add_metric(name="Latency", unit=MetricUnit.Milliseconds, value=latency_ms)
            metrics.add_metric(name="Texts", unit=MetricUnit.Count, value=outcome.texts)
            metrics.add_metric(name="4XXError", unit=MetricUnit.Count, value=int(400 <= status < 500))
            metrics.add_metric(name="5XXError", unit=MetricUnit.Count, value=int(status >= 500))
            if outcome.swapped:
                metrics.add_metric(name="ModelSwaps", unit=MetricUnit.Count, value=1)
            if request_id is not None:
                metrics.add_metadata(key="function_request_id", value=request_id)
            if outcome.version is not None:
                metrics.add_metadata(key="model_version", value=outcome.version)
            metrics.flush_metrics()
            for label, count in sorted(outcome.predicted.items()):
                with single_metric(
                    name="Predictions", unit=MetricUnit.Count, value=count, namespace=metrics.namespace
                ) as metric:
                    metric.add_dimension(name="predicted_class", value=label)


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
