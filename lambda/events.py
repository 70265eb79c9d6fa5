"""The handler's event parsing: a Lambda event in, the texts to classify (or a ``BadRequest``) out.

Events: a direct invoke ``{"text": "..."}`` or ``{"texts": [...]}``, and API Gateway REST (v1), HTTP API (v2) and
Function URL events, whose JSON body may be base64-encoded.

The three HTTP shapes differ only in where the method is (``httpMethod``, or ``requestContext.http.method``); the
body and its ``isBase64Encoded`` flag are the same keys in all three. ``HttpEvent`` reads them with the standard
library, in place of Powertools' event classes, whose import (about 50 ms, with its jmespath and typing_extensions)
was a tenth of a cold start's floor. Nor would Powertools' resolvers (``APIGatewayRestResolver`` and the like) fit
the rules here: a resolver serves one event source, where this function takes all three and direct invokes; it
answers a method it has no route for with 404, where the handler answers 405 with an Allow header; and its
``json_body`` decodes base64 leniently (``b64decode`` without validation) and lets a body that is not JSON or not
UTF-8 escape as an exception (a failed invocation, a 502 at API Gateway), where this answers each with a 400 that
says what was wrong.

The standard library and settings.py only: no model dependencies.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

from settings import Settings

JSON_KINDS = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", str: "a string"}


class BadRequest(Exception):
    """Input the handler cannot use; the message says what was wrong (and never repeats the input)."""


def _kind(value: object) -> str:
    return JSON_KINDS.get(type(value)) or ("an array" if isinstance(value, list) else "an object")


@dataclass(frozen=True)
class HttpEvent:
    """An API Gateway REST (v1), HTTP API (v2) or Function URL event."""

    event: dict[str, Any]
    rest: bool  # v1: the method is ``httpMethod``; else ``requestContext.http.method``

    @property
    def body(self) -> object:
        return self.event.get("body")

    @property
    def is_base64_encoded(self) -> bool:
        return bool(self.event.get("isBase64Encoded"))


def http_event(event: object) -> HttpEvent | None:
    """An API Gateway REST (v1), HTTP API (v2) or Function URL event; None for a direct invoke."""
    if not isinstance(event, dict):
        return None
    if "httpMethod" in event:
        return HttpEvent(event, rest=True)
    context = event.get("requestContext")
    if not isinstance(context, dict) or not isinstance(context.get("http"), dict):
        return None
    return HttpEvent(event, rest=False)


def http_method(event: HttpEvent) -> str:
    """The HTTP event's method in capitals; empty when the event names none."""
    method = event.event.get("httpMethod") if event.rest else event.event["requestContext"]["http"].get("method")
    return str(method).upper() if method is not None else ""


def _json_body(event: HttpEvent) -> object:
    """The decoded JSON body of an HTTP event."""
    body = event.body
    if body is None or body == "":
        raise BadRequest('the request body is empty; send a JSON object such as {"text": "..."}')
    if not isinstance(body, str):
        raise BadRequest(f"the event's body must be a string, not {_kind(body)}")
    if event.is_base64_encoded:
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
    except ValueError:  # an integer of more digits than Python converts (sys.get_int_max_str_digits(), 4,300)
        raise BadRequest("the body's JSON has a number with too many digits") from None
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


def parse_texts(event: object, http: HttpEvent | None, settings: Settings) -> tuple[list[str], bool]:
    """The texts of a POST (``http``) or a direct invoke (``event``), and whether it was a single ``text``; a
    BadRequest says what is wrong with them."""
    return _texts(event if http is None else _json_body(http), settings)
