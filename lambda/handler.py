"""AWS Lambda entry point: classify news text with the champion ONNX int8 model (no torch, no transformers).

Events: a direct invoke ``{"text": "..."}`` or ``{"texts": [...]}``, and API Gateway REST (v1), HTTP API (v2)
and Function URL events, whose JSON body may be base64-encoded. POST classifies; GET tells which model answers.
Configuration: environment variables, see settings.py. Locally: ``python lambda/handler.py "some text"``.

``Service`` is the adapter: events in, responses out, over any ``Store``. ``lambda_handler`` is a ``Service`` over
the container's ``ModelStore``, built from the environment on first use; until then this module imports the
standard library and settings only (no onnxruntime, numpy or tokenizers).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import functools
import json
import logging
import os
import sys
from typing import TYPE_CHECKING, Any, Protocol

from settings import LOGGER, ConfigError, ModelError, Settings

if TYPE_CHECKING:
    from model_store import ModelStore

JSON_HEADERS = {"Content-Type": "application/json"}
ALLOWED_METHODS = ("GET", "POST")
JSON_KINDS = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", str: "a string"}

log = logging.getLogger(LOGGER)
log.setLevel(logging.INFO)


class BadRequest(Exception):
    """Input the handler cannot use; the message says what was wrong (and never repeats the input)."""


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
    """Where the handler gets its limits and its model. ``settings`` may raise ConfigError (a 500), ``get()``
    ModelError (a 503)."""

    @property
    def settings(self) -> Settings: ...
    def get(self) -> Model: ...


@functools.cache
def model_store() -> ModelStore:
    """The container's one store, built on first use; a bad setting raises ConfigError, and is retried next call."""
    from model_store import ModelStore  # onnxruntime, numpy and tokenizers: only with the real store

    return ModelStore(Settings.from_env())


class ContainerStore:
    """The ``Store`` that ``lambda_handler`` serves from: ``model_store()``, built when first asked for."""

    @property
    def settings(self) -> Settings:
        return model_store().settings

    def get(self) -> Model:
        return model_store().get()


def _kind(value: object) -> str:
    return JSON_KINDS.get(type(value)) or ("an array" if isinstance(value, list) else "an object")


def _http_method(event: object) -> str | None:
    """The HTTP method of an API Gateway (v1), HTTP API or Function URL (v2) event; None for a direct invoke."""
    if not isinstance(event, dict):
        return None
    if "httpMethod" in event:
        return str(event["httpMethod"]).upper()
    http = event.get("requestContext", {}).get("http") if isinstance(event.get("requestContext"), dict) else None
    return str(http.get("method", "")).upper() if isinstance(http, dict) else None


def _json_body(event: dict[str, Any]) -> object:
    """The decoded JSON body of an HTTP event."""
    body = event.get("body")
    if body is None or body == "":
        raise BadRequest('the request body is empty; send a JSON object such as {"text": "..."}')
    if not isinstance(body, str):
        raise BadRequest(f"the event's body must be a string, not {_kind(body)}")
    if event.get("isBase64Encoded"):
        try:
            body = base64.b64decode(body, validate=True).decode("utf-8")
        except binascii.Error:
            raise BadRequest("the body is marked base64 but is not valid base64") from None
        except UnicodeDecodeError as exc:
            raise BadRequest(f"the body is not valid UTF-8 (bad byte at offset {exc.start})") from None
    try:
        return json.loads(body)
    except json.JSONDecodeError as exc:
        raise BadRequest(f"the body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise BadRequest("the body's JSON is nested too deeply") from None


def _checked_text(value: object, what: str, settings: Settings) -> str:
    if not isinstance(value, str):
        raise BadRequest(f"{what} must be a string, not {_kind(value)}")
    if not value.strip():
        raise BadRequest(f"{what} is only whitespace" if value else f"{what} is empty")
    if len(value) > settings.max_text_chars:
        raise BadRequest(f"{what} has {len(value)} characters; the most is {settings.max_text_chars} (MAX_TEXT_CHARS)")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BadRequest(f"{what} is not valid Unicode: an unpaired surrogate at character {exc.start}") from None
    return value


def _texts(payload: object, settings: Settings) -> tuple[list[str], bool]:
    """The texts to classify, and whether the request was a single ``text``."""
    if not isinstance(payload, dict):
        raise BadRequest(f'the request must be a JSON object with "text" or "texts", not {_kind(payload)}')
    if "text" in payload and "texts" in payload:
        raise BadRequest('send either "text" or "texts", not both')
    if "text" in payload:
        return [_checked_text(payload["text"], '"text"', settings)], True
    if "texts" not in payload:
        raise BadRequest('missing "text" (a string) or "texts" (a list of strings)')
    texts = payload["texts"]
    if not isinstance(texts, list):
        raise BadRequest(f'"texts" must be a list of strings, not {_kind(texts)}')
    if not texts:
        raise BadRequest('"texts" is empty')
    if len(texts) > settings.max_batch:
        raise BadRequest(f'"texts" has {len(texts)} items; the most is {settings.max_batch} (MAX_BATCH)')
    return [_checked_text(text, f'"texts"[{i}]', settings) for i, text in enumerate(texts)], False


class Service:
    """The handler over ``store``: answers every event with a response, and never raises."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def _answer(self, event: object, method: str | None) -> tuple[int, Any]:
        """Status code and body for one event."""
        try:
            settings = self.store.settings  # a configuration error comes first, whatever the event
            if method == "GET":
                model = self.store.get()
                return 200, {"model_version": model.version, "labels": model.predictor.labels}
            if method is not None and method not in ALLOWED_METHODS:
                error = "method not allowed: POST a JSON object to classify, GET to see the model version"
                return 405, {"error": error}
            texts, single = _texts(event if method is None else _json_body(event), settings)
            model = self.store.get()
            results = [result | {"model_version": model.version} for result in model.predictor.predict(texts)]
            return 200, results[0] if single else results
        except BadRequest as exc:
            return 400, {"error": str(exc)}
        except ModelError as exc:
            return 503, {"error": f"no model available: {exc}"}
        except ConfigError as exc:
            return 500, {"error": f"configuration error: {exc}"}

    def handle(self, event: Any, context: Any) -> dict[str, Any]:
        """The response to one Lambda event: a proxy response for an HTTP event, else statusCode and body."""
        method = _http_method(event)
        try:
            status, body = self._answer(event, method)
        except Exception:  # the last guard: a bug must still give a response, not a crashed invocation
            log.exception("unexpected error")
            status, body = 500, {"error": "internal error"}
        if method is None:
            return {"statusCode": status, "body": body}
        headers = JSON_HEADERS | ({"Allow": ", ".join(ALLOWED_METHODS)} if status == 405 else {})
        return {"statusCode": status, "headers": headers, "body": json.dumps(body), "isBase64Encoded": False}


service = Service(ContainerStore())


def lambda_handler(event: Any, context: Any) -> dict[str, Any]:
    """The Lambda handler: never raises, whatever the event."""
    return service.handle(event, context)


def main(argv: list[str] | None = None) -> int:
    """Classify the texts given as arguments, configured by the same environment variables as the Lambda."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("texts", nargs="+", help="one text, or several for a batch")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(message)s")
    event = {"text": args.texts[0]} if len(args.texts) == 1 else {"texts": args.texts}
    response = lambda_handler(event, None)
    print(json.dumps(response["body"], indent=2, ensure_ascii=False))
    return 0 if response["statusCode"] == 200 else 1


# In Lambda, load the model during the init phase, which runs at full CPU, rather than in the first request.
if os.environ.get("AWS_LAMBDA_FUNCTION_NAME"):
    with contextlib.suppress(ConfigError):
        model_store().refresh()

if __name__ == "__main__":
    sys.exit(main())
