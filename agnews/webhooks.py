"""UI promotion that reaches the Lambda by itself: a receiver for MLflow's model registry webhooks, and their
registration.

MLflow (3.17) POSTs each registry event as JSON, ``{"entity": "model_version_alias", "action": "created" or
"deleted", "timestamp": ..., "data": {"name": ..., "alias": ..., "version": ...}}``, with the headers
``X-MLflow-Delivery-Id``, ``X-MLflow-Timestamp`` (Unix seconds) and ``X-MLflow-Signature``: ``v1,`` and the base64
HMAC-SHA256, under the webhook's secret, of ``<delivery id>.<timestamp>.<body>`` (``mlflow/webhooks/delivery.py``).
A retry resends the same delivery id, timestamp and signature.

The receiver answers:

- 401, doing nothing, when the signature is missing or wrong, or the timestamp is more than ``tolerance_s`` away;
- 200 ``ignored`` for other entities, other models and other aliases than @champion;
- 200 ``noted`` when @champion was deleted: there is nothing new to serve, and storage keeps serving its version;
- 200 ``duplicate`` for a delivery id it has accepted before;
- 202 ``accepted`` otherwise, and its worker thread then runs the mirror (``publishing.mirror``), which completes
  the move (@previous, ``promoted_by``) and copies the champion to storage under the model's lease. Events that
  arrive while a mirror runs are coalesced into one more run: the mirror reads the registry as it is then.

A mirror that fails is retried with backoff (``RETRY_SECONDS``), then left to ``python -m steps.mirror``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from mlflow import MlflowClient
from mlflow.entities.webhook import Webhook
from mlflow.exceptions import MlflowException
from omegaconf import DictConfig

from agnews.errors import ConfigError, PipelineError, TrackingError
from agnews.publishing import Mirrored, mirror
from agnews.registry import CHAMPION

SIGNATURE_HEADER, TIMESTAMP_HEADER, DELIVERY_HEADER = "X-MLflow-Signature", "X-MLflow-Timestamp", "X-MLflow-Delivery-Id"
SIGNATURE_VERSION = "v1"
ENTITY = "model_version_alias"
EVENTS = ("model_version_alias.created", "model_version_alias.deleted")
SECRET_ENV = "AGNEWS_WEBHOOK_SECRET"
WEBHOOK_NAME = "agnews-promotion"
TOLERANCE_SECONDS = 300  # a delivery whose timestamp is further from now is refused (replays)
MAX_BODY = 1024 * 1024
REMEMBERED = 10_000  # delivery ids kept for de-duplication
RETRY_SECONDS = (2.0, 10.0, 30.0)  # pauses before the retries of a failed mirror

log = logging.getLogger(__name__)


class Unauthorized(Exception):
    """A delivery that is not provably from the tracking server; the message says why."""


def signature(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    """MLflow's signature of a delivery: ``v1,<base64 HMAC-SHA256 of '<delivery id>.<timestamp>.<body>'>``."""
    signed = f"{delivery_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).digest()
    return f"{SIGNATURE_VERSION},{base64.b64encode(digest).decode()}"


def verify(
    secret: str, headers: Mapping[str, str], body: bytes, now: float, tolerance_s: float = TOLERANCE_SECONDS
) -> str:
    """The delivery id of a delivery whose signature and timestamp check out; Unauthorized otherwise. The signature
    header may carry several space-separated signatures (as Standard Webhooks allows); one match is enough."""
    lowered = {key.lower(): value for key, value in headers.items()}  # HTTP header names are case-insensitive
    names = (DELIVERY_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER)
    delivery_id, timestamp, signed = (lowered.get(name.lower(), "") for name in names)
    if not (delivery_id and timestamp and signed):
        raise Unauthorized(f"missing {DELIVERY_HEADER}, {TIMESTAMP_HEADER} or {SIGNATURE_HEADER}")
    if not timestamp.isdecimal():
        raise Unauthorized(f"{TIMESTAMP_HEADER} {timestamp!r} is not Unix seconds")
    if abs(now - int(timestamp)) > tolerance_s:
        raise Unauthorized(f"{TIMESTAMP_HEADER} {timestamp} is more than {tolerance_s:g}s from now ({now:.0f})")
    expected = signature(secret, delivery_id, timestamp, body)
    if not any(hmac.compare_digest(expected, candidate) for candidate in signed.split()):
        raise Unauthorized("the signature does not match the body under the webhook's secret")
    return delivery_id


@dataclass(frozen=True)
class Event:
    """The fields of a delivery that the receiver acts on."""

    entity: str
    action: str
    name: str
    alias: str
    version: str | None

    @classmethod
    def parse(cls, body: bytes) -> Event:
        """The event in a delivery's body; ValueError when it is not one."""
        doc = json.loads(body)
        data = doc.get("data") if isinstance(doc, dict) else None
        if not isinstance(data, dict):
            raise ValueError("the body is not a webhook payload with a 'data' object")
        version = data.get("version")
        return cls(
            str(doc.get("entity", "")),
            str(doc.get("action", "")),
            str(data.get("name", "")),
            str(data.get("alias", "")),
            None if version is None else str(version),
        )


class Receiver:
    """The webhook receiver for one registered model (``cfg.registry.model_name``) and its storage, as a WSGI app.

    ``run_mirror`` defaults to ``publishing.mirror``; ``clock`` to ``time.time``.
    """

    def __init__(
        self,
        cfg: DictConfig,
        secret: str,
        tolerance_s: float = TOLERANCE_SECONDS,
        run_mirror: Callable[[DictConfig], Mirrored] = mirror,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not secret:
            raise ConfigError(f"the webhook receiver needs a secret: set {SECRET_ENV}")
        self.cfg, self.secret, self.tolerance_s = cfg, secret, tolerance_s
        self.model_name = str(cfg.registry.model_name)
        self.run_mirror, self.clock = run_mirror, clock
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._seen_lock = threading.Lock()
        self._pending = threading.Event()
        self._closing = threading.Event()
        self.accepted = 0  # deliveries accepted, for /health
        self.mirrors = 0  # finished mirror runs, for /health
        self.last: Mirrored | None = None
        self._worker = threading.Thread(target=self._work, name="webhook-mirror", daemon=True)
        self._worker.start()

    def close(self) -> None:
        self._closing.set()
        self._pending.set()
        self._worker.join()

    def handle(self, method: str, path: str, headers: Mapping[str, str], body: bytes) -> tuple[int, dict[str, Any]]:
        """The status and JSON answer to one request."""
        if method == "GET" and path.rstrip("/") in ("", "/health"):
            last = self.last.version if self.last else None
            return 200, {
                "status": "ok",
                "model": self.model_name,
                "accepted": self.accepted,
                "mirrors": self.mirrors,
                "last_version": last,
            }
        if method != "POST":
            return 405, {"error": f"{method} is not allowed: MLflow delivers webhooks with POST"}
        try:
            delivery_id = verify(self.secret, headers, body, self.clock(), self.tolerance_s)
        except Unauthorized as exc:
            log.warning("refused a delivery: %s", exc)
            return 401, {"error": str(exc)}
        try:
            event = Event.parse(body)
        except ValueError as exc:
            return 400, {"error": f"not a webhook payload: {exc}"}
        ignored = self._ignored(event)
        if ignored:
            return 200, {"status": "ignored", "reason": ignored, "delivery": delivery_id}
        with self._seen_lock:
            if delivery_id in self._seen:
                return 200, {"status": "duplicate", "delivery": delivery_id}
            self._seen[delivery_id] = None
            if len(self._seen) > REMEMBERED:
                self._seen.popitem(last=False)
            if event.action == "deleted":
                note = f"@{CHAMPION} of {event.name} was deleted: storage keeps serving its version"
                log.warning("delivery %s: %s", delivery_id, note)
                return 200, {"status": "noted", "reason": note}
            self.accepted += 1
        log.info("delivery %s: @%s of %s moved to v%s", delivery_id, CHAMPION, event.name, event.version)
        self._pending.set()
        return 202, {"status": "accepted", "delivery": delivery_id}

    def _ignored(self, event: Event) -> str | None:
        if event.entity != ENTITY:
            return f"entity {event.entity!r}: only {ENTITY} events move the champion"
        if event.name != self.model_name:
            return f"model {event.name!r}: this receiver serves {self.model_name!r}"
        if event.alias != CHAMPION:
            return f"alias @{event.alias}: only @{CHAMPION} is served"
        return None

    def _work(self) -> None:
        while True:
            self._pending.wait()
            if self._closing.is_set():
                return
            self._pending.clear()
            for pause in (*RETRY_SECONDS, None):
                try:
                    self.last = self.run_mirror(self.cfg)
                except PipelineError as exc:
                    log.error("mirror failed: %s", exc)
                except Exception:  # the worker must outlive any one failure
                    log.exception("mirror failed")
                else:
                    self.mirrors += 1
                    log.info("storage serves %s v%s (%s)", self.model_name, self.last.version, self.last.pointer)
                    break
                if pause is None or self._closing.wait(pause):
                    log.error("giving up until the next event: run `python -m steps.mirror` to catch up")
                    break

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = 0
        if length > MAX_BODY:
            status, answer = 413, {"error": f"the body is over {MAX_BODY} bytes"}
        else:
            body = environ["wsgi.input"].read(length) if length else b""
            headers = {key[5:].replace("_", "-"): value for key, value in environ.items() if key.startswith("HTTP_")}
            status, answer = self.handle(environ["REQUEST_METHOD"], environ.get("PATH_INFO", "/"), headers, body)
        data = json.dumps(answer).encode()
        start_response(
            f"{status} {HTTPStatus(status).phrase}",
            [("Content-Type", "application/json"), ("Content-Length", str(len(data)))],
        )
        return [data]


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


def make_receiver_server(receiver: Receiver, host: str, port: int) -> WSGIServer:
    """A threading WSGI server (the standard library's) serving ``receiver`` on ``host:port``."""
    return make_server(host, port, receiver, server_class=_ThreadingServer, handler_class=_QuietHandler)


def register_webhook(client: MlflowClient, url: str, secret: str, name: str = WEBHOOK_NAME) -> Webhook:
    """Create the webhook ``name`` for @champion moves, or point an existing one at ``url`` with ``secret``."""
    if not url:
        raise ConfigError("the webhook needs the receiver's URL (--url http://host:port/)")
    if not secret:
        raise ConfigError(f"the webhook needs a secret: set {SECRET_ENV}")
    description = "agnews: mirror @champion to storage when it moves (python -m steps.webhook serve)"
    try:
        existing = [hook for hook in _all_webhooks(client) if hook.name == name]
        if existing:
            return client.update_webhook(
                existing[0].webhook_id,
                url=url,
                events=list(EVENTS),
                secret=secret,
                status="ACTIVE",
                description=description,
            )
        return client.create_webhook(name, url, list(EVENTS), description=description, secret=secret, status="ACTIVE")
    except MlflowException as exc:
        raise TrackingError(
            f"the tracking server refused the webhook to {url}: {exc.message} (a server delivers to http:// and to "
            "private addresses only with MLFLOW_WEBHOOK_ALLOWED_SCHEMES=http,https and "
            "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS=true)"
        ) from None


def _all_webhooks(client: MlflowClient) -> list[Webhook]:
    hooks: list[Webhook] = []
    token = None
    while True:
        page = client.list_webhooks(max_results=100, page_token=token)
        hooks.extend(page)
        token = page.token
        if not token:
            return hooks
