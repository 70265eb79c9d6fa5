"""`steps.webhook serve`: UI promotion that reaches the Lambda by itself, through a receiver that keeps storage on the
registry's @champion, woken early by MLflow's model registry webhooks (their set-up: ``webhook_admin``).

The receiver is level-triggered. Every ``webhook.reconcile_s`` seconds it compares the registry's @champion with
the version that storage's ``champion.json`` names, and mirrors @champion when they differ, under the model's lease
(``mirror.reconcile``, the decision ``register`` makes first too);
a delivery only makes it look sooner. A move made while the receiver was down, or one whose delivery the tracking
server failed to make (MLflow's deliveries are fire-and-forget: 3 retries on 429/5xx, then only a log line on the
server), is served within one interval. ``/health`` reports the last reconcile and its outcome, both versions, the
deliveries received and the seconds since the two last agreed; whatever goes wrong is one log line with its cause.

MLflow (3.17) POSTs each registry event as JSON, ``{"entity": "model_version_alias", "action": "created" or
"deleted", "timestamp": ..., "data": {"name": ..., "alias": ..., "version": ...}}``, with the headers
``X-MLflow-Delivery-Id``, ``X-MLflow-Timestamp`` (Unix seconds) and ``X-MLflow-Signature``: ``v1,`` and the base64
HMAC-SHA256, under the webhook's secret, of ``<delivery id>.<timestamp>.<body>`` (``mlflow/webhooks/delivery.py``).
A retry resends the same delivery id, timestamp and signature. The receiver answers:

- 431 for headers over ``MAX_HEADERS``, 411 for a POST without ``Content-Length``, 400 for one that is not a number,
  413 over ``MAX_DELIVERY_BYTES`` (waitress refuses all but the 411 before reading the body);
- 401, doing nothing, when the signature is missing or wrong, or the timestamp is more than ``TOLERANCE_SECONDS``
  (300) from now;
- 400 for a signed body that is not a webhook payload (not JSON, or nested beyond what the parser takes);
- 200 ``ignored`` for other entities, other models and other aliases than @champion and @candidate (the test
  deliveries of ``register`` name MLflow's ``example_model``, and so are answered this way once their signature
  checks out);
- 200 ``noted`` when @champion was deleted: there is nothing new to serve, and storage keeps serving its version (a
  deleted @candidate is accepted: the rollout's candidate leaves ``champion.json``);
- 200 ``duplicate`` for a delivery id it has accepted before;
- 202 ``accepted`` otherwise, and the reconcile runs at once.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import re
import socket
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any, cast

from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.server import TcpWSGIServer

from agnews.errors import ConfigError, PipelineError
from agnews.names import CANDIDATE, CHAMPION, WEBHOOK_SECRET_ENV, Via
from agnews.promotion.mirror import ModelStore, model_lease, reconcile
from agnews.settings import RegistrySettings, StorageSettings, WebhookSettings

SIGNATURE_HEADER, TIMESTAMP_HEADER, DELIVERY_HEADER = "X-MLflow-Signature", "X-MLflow-Timestamp", "X-MLflow-Delivery-Id"
SIGNATURE_VERSION = "v1"
ENTITY = "model_version_alias"
TOLERANCE_SECONDS = 300  # a delivery whose timestamp is further from now is refused (replays)
TIMESTAMP = re.compile(r"[0-9]{1,12}")  # Unix seconds: a longer header is refused before it is parsed
# A delivery is a few hundred bytes of JSON; this bounds what an unauthenticated POST can make the receiver read (the
# Lambda's local server, lambda/local.py, takes Lambda's 6 MiB payload limit instead).
MAX_DELIVERY_BYTES = 1024 * 1024
# A delivery's headers take a few hundred bytes. Over this, waitress answers 431 before parsing them: a Content-Length
# of more digits than Python's int() takes (4,300) would otherwise make its parser drop the connection.
MAX_HEADERS = 4096
REMEMBERED = 10_000  # delivery ids kept for de-duplication

log = logging.getLogger(__name__)


class Unauthorized(Exception):
    """A delivery that is not provably from the tracking server; the message says why."""


def signature(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    """MLflow's signature of a delivery: ``v1,<base64 HMAC-SHA256 of '<delivery id>.<timestamp>.<body>'>``."""
    signed = f"{delivery_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret.encode(), signed, hashlib.sha256).digest()
    return f"{SIGNATURE_VERSION},{base64.b64encode(digest).decode()}"


def verify(secret: str, headers: Mapping[str, str], body: bytes, now: float) -> str:
    """The delivery id of a delivery whose signature and timestamp check out; Unauthorized otherwise. The signature
    header may carry several space-separated signatures (as Standard Webhooks allows); one match is enough."""
    lowered = {key.lower(): value for key, value in headers.items()}  # HTTP header names are case-insensitive
    names = (DELIVERY_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER)
    delivery_id, timestamp, signed = (lowered.get(name.lower(), "") for name in names)
    if not (delivery_id and timestamp and signed):
        raise Unauthorized(f"missing {DELIVERY_HEADER}, {TIMESTAMP_HEADER} or {SIGNATURE_HEADER}")
    if not TIMESTAMP.fullmatch(timestamp):
        raise Unauthorized(f"{TIMESTAMP_HEADER} {timestamp[:20]!r} is not Unix seconds")
    if abs(now - int(timestamp)) > TOLERANCE_SECONDS:
        raise Unauthorized(f"{TIMESTAMP_HEADER} {timestamp} is more than {TOLERANCE_SECONDS}s from now ({now:.0f})")
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
        try:
            doc = json.loads(body)
        except RecursionError:
            raise ValueError("the body is nested too deeply") from None
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


@dataclass(frozen=True)
class Reconciled:
    """One reconcile: when it ran, what it found, and what became of it."""

    at: str
    outcome: str
    ok: bool
    registry: int | None
    served: int | None
    candidate: int | None = None  # the rollout's candidate that storage serves beside the champion


class Receiver:
    """The receiver for one registered model (``registry.model_name``) and its storage, as a WSGI app; its worker
    thread reconciles every ``webhook.reconcile_s`` seconds, and at once after an accepted delivery.
    """

    def __init__(
        self, registry: RegistrySettings, storage: StorageSettings, webhook: WebhookSettings, secret: str
    ) -> None:
        if not secret:
            raise ConfigError(f"the webhook receiver needs a secret: set {WEBHOOK_SECRET_ENV}")
        self.registry, self.storage, self.secret = registry, storage, secret
        self.model_name = registry.model_name
        self.reconcile_s = float(webhook.reconcile_s)
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()
        self._pending = threading.Event()
        self._closing = threading.Event()
        self.deliveries: Counter[str] = Counter()  # the answers given to deliveries, for /health
        self.last: Reconciled | None = None
        self.agreed_at: float | None = None  # when a reconcile last found storage serving @champion
        self.disagreed_at: float | None = None  # since when reconciles have failed or found the two sides apart
        self._worker = threading.Thread(target=self._work, name="webhook-reconcile", daemon=True)
        self._worker.start()

    def close(self) -> None:
        self._closing.set()
        self._pending.set()
        self._worker.join()

    def degraded(self) -> str | None:
        """Why the receiver is not doing its job: its last reconcile failed, or the registry and storage have been
        apart for more than one interval; None when it is."""
        if self.last is not None and not self.last.ok:
            return f"the last reconcile failed: {self.last.outcome}"
        apart = None if self.disagreed_at is None else time.time() - self.disagreed_at
        if apart is not None and apart > self.reconcile_s:
            return f"the registry and storage have disagreed for {apart:.0f}s, more than one interval"
        return None

    def health(self) -> dict[str, Any]:
        """What ``GET /health`` answers."""
        now = time.time()
        since = None if self.agreed_at is None else round(now - self.agreed_at, 1)
        why = self.degraded()
        return {
            "status": "degraded" if why else "ok",
            **({"degraded": why} if why else {}),
            "model": self.model_name,
            "reconcile_s": self.reconcile_s,
            "last_reconcile": asdict(self.last) if self.last else None,
            "champion": {"registry": self.last.registry, "served": self.last.served} if self.last else None,
            "candidate": {"served": self.last.candidate} if self.last else None,
            "seconds_since_agreed": since,
            "deliveries": dict(self.deliveries),
        }

    def handle(self, method: str, path: str, headers: Mapping[str, str], body: bytes) -> tuple[int, dict[str, Any]]:
        """The status and JSON answer to one request."""
        if method == "GET" and path.rstrip("/") in ("", "/health"):
            report = self.health()
            return (200 if report["status"] == "ok" else 503), report
        if method != "POST":
            return 405, {"error": f"{method} is not allowed: MLflow delivers webhooks with POST"}
        status, answer = self._deliver(headers, body)
        with self._lock:
            self.deliveries[answer.get("status", "refused")] += 1
        return status, answer

    def _deliver(self, headers: Mapping[str, str], body: bytes) -> tuple[int, dict[str, Any]]:
        try:
            delivery_id = verify(self.secret, headers, body, time.time())
        except Unauthorized as exc:
            log.warning("refused a delivery: %s", exc)
            return 401, {"error": str(exc)}
        try:
            event = Event.parse(body)
        except ValueError as exc:
            log.warning("refused delivery %s: not a webhook payload: %s", delivery_id, exc)
            return 400, {"error": f"not a webhook payload: {exc}"}
        ignored = self._ignored(event)
        if ignored:
            return 200, {"status": "ignored", "reason": ignored, "delivery": delivery_id}
        with self._lock:
            if delivery_id in self._seen:
                return 200, {"status": "duplicate", "delivery": delivery_id}
            self._seen[delivery_id] = None
            if len(self._seen) > REMEMBERED:
                self._seen.popitem(last=False)
        if event.action == "deleted" and event.alias == CHAMPION:
            note = f"@{CHAMPION} of {event.name} was deleted: storage keeps serving its version"
            log.warning("delivery %s: %s", delivery_id, note)
            return 200, {"status": "noted", "reason": note}
        moved = "was deleted" if event.action == "deleted" else f"moved to v{event.version}"
        log.info("delivery %s: @%s of %s %s", delivery_id, event.alias, event.name, moved)
        self._pending.set()
        return 202, {"status": "accepted", "delivery": delivery_id}

    def _ignored(self, event: Event) -> str | None:
        if event.entity != ENTITY:
            return f"entity {event.entity!r}: only {ENTITY} events move the champion"
        if event.name != self.model_name:
            return f"model {event.name!r}: this receiver serves {self.model_name!r}"
        if event.alias not in (CHAMPION, CANDIDATE):
            return f"alias @{event.alias}: only @{CHAMPION} and @{CANDIDATE} are served"
        return None

    def reconcile(self, via: Via) -> Reconciled:
        """Compare @champion with ``champion.json`` and mirror when they differ (``mirror.reconcile``, under the
        model's lease); never raises: a failure is its outcome, and one log line."""
        registry = served = candidate = None
        try:
            model = ModelStore.open(self.registry, self.storage)
            with model_lease(model, self.storage, "reconcile") as (lease, client):
                found = reconcile(model, lease, client, via)
            registry, served, candidate = found.champion, found.served, found.candidate
            beside = f" with @{CANDIDATE} v{candidate}" if candidate is not None else ""
            if found.mirrored is not None:
                outcome = f"mirrored @{CHAMPION} v{found.mirrored.version}{beside} to {found.mirrored.pointer}"
            elif registry is None:
                outcome = f"the registry has no @{CHAMPION} for {self.model_name}: nothing to serve"
            else:
                outcome = f"storage serves @{CHAMPION} v{served}{beside}"
            if found.recovered is not None:
                outcome = f"recorded the move to v{found.recovered.to.version} that the history lacked; {outcome}"
            if found.mirrored is not None or found.recovered is not None:
                log.info("reconcile (%s): %s", via, outcome)
            ok = True
        except PipelineError as exc:
            outcome, ok = f"failed: {exc}", False
        except Exception as exc:  # the worker must outlive any one failure; the cause is the log line
            outcome, ok = f"failed: {type(exc).__name__}: {exc}", False
        if not ok:
            log.error("reconcile (%s) %s", via, outcome)
        if ok and registry is not None and registry == served:
            self.agreed_at = time.time()
        if ok and (registry is None or registry == served):  # nothing to serve is no disagreement
            self.disagreed_at = None
        elif self.disagreed_at is None:
            self.disagreed_at = time.time()
        at = datetime.now(UTC).isoformat(timespec="seconds")
        self.last = Reconciled(at, outcome, ok, registry, served, candidate)
        return self.last

    def _work(self) -> None:
        via: Via = "timer"  # the first look, at start-up, catches up on moves made while the receiver was down
        while not self._closing.is_set():
            self.reconcile(via)
            woken = self._pending.wait(self.reconcile_s)
            self._pending.clear()
            via = "delivery" if woken else "timer"

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        method, length = environ["REQUEST_METHOD"], environ.get("CONTENT_LENGTH", "")
        if method == "POST" and not length:
            status, answer = 411, {"error": "a delivery needs a Content-Length"}
        else:
            # waitress has refused a Content-Length that is not a number, or over MAX_DELIVERY_BYTES, before reading
            body = environ["wsgi.input"].read(int(length)) if length else b""
            headers = {key[5:].replace("_", "-"): value for key, value in environ.items() if key.startswith("HTTP_")}
            status, answer = self.handle(method, environ.get("PATH_INFO", "/"), headers, body)
        data = json.dumps(answer).encode()
        start_response(
            f"{status} {HTTPStatus(status).phrase}",
            [("Content-Type", "application/json"), ("Content-Length", str(len(data)))],
        )
        return [data]


class EvictingServer(TcpWSGIServer):
    """waitress' TCP server, except at its connection limit: where waitress stops accepting until a connection
    closes (stalled clients then keep ``/health`` and deliveries waiting in the backlog for ``read_timeout_s``, round
    after round), this one closes the connection that has been idle longest, without a request in progress, and
    takes the next."""

    def readable(self) -> bool:
        super().readable()  # the periodic clean-up of connections silent for longer than channel_timeout
        return bool(self.accepting)

    def handle_accept(self) -> None:
        open_channels: dict[int, HTTPChannel] = cast(Any, self.active_channels)  # the stubs type it as one channel
        channels = list(open_channels.values())
        idle = [channel for channel in channels if not channel.requests]
        if len(channels) >= self.adj.connection_limit and idle:
            min(idle, key=lambda channel: channel.last_activity).handle_close()
        super().handle_accept()


def make_receiver_server(receiver: Receiver, sock: socket.socket, webhook: WebhookSettings) -> EvictingServer:
    """A waitress server for ``receiver`` on ``sock``: requests are read without a thread, so a stalled client holds
    none; ``webhook.threads`` answer at once, at most ``webhook.connections`` are open (a new one closes the one idle
    longest: ``EvictingServer``), a connection silent for ``webhook.read_timeout_s`` is closed, and headers over
    MAX_HEADERS or a body over MAX_DELIVERY_BYTES are refused before they are parsed or read."""
    adjustments = Adjustments(
        sockets=[sock],
        threads=webhook.threads,
        connection_limit=webhook.connections,
        channel_timeout=int(webhook.read_timeout_s),
        cleanup_interval=1,
        max_request_body_size=MAX_DELIVERY_BYTES,
        max_request_header_size=MAX_HEADERS,
        ident="agnews-webhook",
    )
    where = (sock.family, sock.type, sock.proto, sock.getsockname())
    return EvictingServer(receiver, map={}, _sock=sock, adj=adjustments, bind_socket=False, sockinfo=where)
