"""`steps.webhook register` and `unregister`: the tracking server's webhook that wakes the receiver
(``receiver``), set up and removed through MLflow's webhook API.

``register`` refuses to leave a webhook that cannot deliver, and never trades a working one for one that cannot: it
creates a new webhook beside any existing one, has the tracking server deliver ``webhook.test_deliveries`` test
events to it, each on a new connection so that they reach several of the server's workers, and only then removes the
webhooks it replaces. A test that fails (a worker that cannot decrypt the stored secret, the receiver unreachable or
refusing the signature) removes the new webhook again, names the cause and leaves the existing one as it was.
``unregister`` removes it, retrying across workers.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import sqlalchemy
import sqlalchemy.exc
from google.protobuf.message import Message
from mlflow.entities.webhook import Webhook, WebhookEvent, WebhookEventStr, WebhookTestResult
from mlflow.exceptions import MlflowException
from mlflow.protos.webhooks_pb2 import CreateWebhook, DeleteWebhook, ListWebhooks, TestWebhook
from mlflow.store.model_registry.dbmodels.models import SqlWebhook
from mlflow.utils.credentials import get_default_host_creds
from mlflow.utils.proto_json_utils import message_to_json
from mlflow.utils.rest_utils import call_endpoint
from mlflow.utils.time import get_current_time_millis

from agnews.config import redact
from agnews.database import database_url, reason
from agnews.errors import ConfigError, TrackingError
from agnews.names import WEBHOOK_KEY_ENV, WEBHOOK_SECRET_ENV
from agnews.settings import TrackingSettings, WebhookSettings
from agnews.tracking import without_credentials

EVENTS: tuple[WebhookEventStr, ...] = ("model_version_alias.created", "model_version_alias.deleted")
WEBHOOK_NAME = "agnews-promotion"
WEBHOOKS_API = "/api/2.0/mlflow/webhooks"
FRESH_CONNECTION = {"Connection": "close"}  # each call to a server with several workers may reach another one


def http_settings(webhook: WebhookSettings) -> dict[str, str]:
    """MLflow's client settings for the webhook calls: no retries (it would retry a 500 for minutes) and a timeout
    of ``webhook.http_timeout_s`` seconds per call."""
    return {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(webhook.http_timeout_s)}


def refused(exc: MlflowException, url: str) -> TrackingError:
    """What a tracking server's refusal of a webhook call means, in one line."""
    message = exc.message.splitlines()[0] if exc.message else ""
    if "scheme" in message:
        cause = "it delivers over http only with MLFLOW_WEBHOOK_ALLOWED_SCHEMES=http,https"
    elif "public" in message or "private" in message or "resolve" in message:
        cause = "it delivers to a private address only with MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS=true"
    elif exc.get_http_status_code() >= 500:
        cause = (
            f"it cannot decrypt the webhook secrets it stores (HTTP {exc.get_http_status_code()}): start every "
            f"worker with the same {WEBHOOK_KEY_ENV}"
        )
    else:
        cause = message
    return TrackingError(f"the tracking server refused the webhook to {url}: {cause}")


def server_uri(tracking: TrackingSettings) -> str:
    """The tracking server's URI without user info (connect() has moved those credentials to MLflow's variables,
    which its calls read); a ConfigError, naming the URI, for a local store, which has no webhook API."""
    uri = without_credentials(tracking.uri)[0]
    if urlsplit(uri).scheme not in ("http", "https"):
        raise ConfigError(
            "webhooks need a tracking server (`mlflow server`; set MLFLOW_TRACKING_URI or tracking.uri to its "
            f"http(s) address): the tracking URI is {redact(tracking.uri)}"
        )
    return uri


def _call(
    tracking: TrackingSettings, endpoint: str, method: str, request: Message | None, response: Message, tries: int = 1
) -> Any:
    """One call to the tracking server's webhook API, on a connection of its own (MLflow's client keeps one open,
    so all its calls reach the same worker): a 5xx is tried again, up to ``tries`` calls, each maybe on another
    worker. MlflowException when every call fails, or one fails with a 4xx."""
    creds = get_default_host_creds(server_uri(tracking))
    body = None if request is None else message_to_json(request)
    for _ in range(tries - 1):
        try:
            return call_endpoint(creds, endpoint, method, body, response, FRESH_CONNECTION)
        except MlflowException as exc:
            if exc.get_http_status_code() < 500:
                raise
    return call_endpoint(creds, endpoint, method, body, response, FRESH_CONNECTION)


def webhooks_named(tracking: TrackingSettings, name: str, tries: int) -> list[Webhook]:
    """The tracking server's webhooks called ``name``."""
    hooks: list[Webhook] = []
    token = None
    while True:
        listing = ListWebhooks(max_results=100, page_token=token)
        page = _call(tracking, WEBHOOKS_API, "GET", listing, ListWebhooks.Response(), tries)
        hooks.extend(hook for hook in map(Webhook.from_proto, page.webhooks) if hook.name == name)
        token = page.next_page_token
        if not token:
            return hooks


def _delete(tracking: TrackingSettings, hook: Webhook, tries: int) -> None:
    _call(tracking, f"{WEBHOOKS_API}/{hook.webhook_id}", "DELETE", None, DeleteWebhook.Response(), tries)


def _test(tracking: TrackingSettings, webhook: WebhookSettings, hook: Webhook) -> None:
    """Have the server deliver ``webhook.test_deliveries`` test events to ``hook``, each on a connection of its own;
    a TrackingError (or the MlflowException of a refused call) for the first that fails."""
    for _ in range(webhook.test_deliveries):
        test = _call(tracking, f"{WEBHOOKS_API}/{hook.webhook_id}/test", "POST", TestWebhook(), TestWebhook.Response())
        result = WebhookTestResult.from_proto(test.result)
        if not result.success:
            raise TrackingError(f"a test delivery to {hook.url} failed: {_why(result)}")


def register_webhook(
    tracking: TrackingSettings, webhook: WebhookSettings, url: str, secret: str, name: str = WEBHOOK_NAME
) -> Webhook:
    """Create the webhook ``name`` for @champion moves to ``url`` with ``secret``, test it (``_test``), and only then
    remove the webhooks called ``name`` that were there before. A failed test removes the new webhook again, leaves
    the existing ones as they were and raises a TrackingError with the cause."""
    if not url:
        raise ConfigError("the webhook needs the receiver's URL (--url http://host:port/)")
    if not secret:
        raise ConfigError(f"the webhook needs a secret: set {WEBHOOK_SECRET_ENV}")
    tries = webhook.tries
    events = [WebhookEvent.from_str(event).to_proto() for event in EVENTS]
    description = "agnews: reconcile @champion with storage when it moves (python -m steps.webhook serve)"
    create = CreateWebhook(name=name, url=url, events=events, description=description, secret=secret)
    try:
        existing = webhooks_named(tracking, name, tries)
        hook = Webhook.from_proto(_call(tracking, WEBHOOKS_API, "POST", create, CreateWebhook.Response()).webhook)
    except MlflowException as exc:
        raise refused(exc, url) from None
    try:
        _test(tracking, webhook, hook)
    except (MlflowException, TrackingError) as exc:
        cause = refused(exc, url) if isinstance(exc, MlflowException) else exc
        kept = f"; {', '.join(f'{old.webhook_id} to {old.url}' for old in existing)} left as it was" if existing else ""
        try:
            _delete(tracking, hook, tries)
        except MlflowException:
            raise TrackingError(
                f"{cause}; removing the webhook failed too: `python -m steps.webhook unregister`"
            ) from None
        raise TrackingError(f"{cause}; the webhook was removed{kept}") from None
    try:
        for old in existing:
            _delete(tracking, old, tries)
    except MlflowException as exc:
        raise TrackingError(
            f"the webhook {hook.webhook_id} to {url} works, but removing the one it replaces failed: "
            f"{refused(exc, url)}; `python -m steps.webhook unregister` removes both"
        ) from None
    return hook


def _why(result: WebhookTestResult) -> str:
    if result.response_status == 401:
        return f"the receiver refused its signature: give `serve` and `register` the same {WEBHOOK_SECRET_ENV}"
    if result.response_status:
        return f"the receiver answered HTTP {result.response_status}: {(result.response_body or '')[:200]}"
    error = result.error_message or "no answer"
    if "not a public IP" in error:
        return "the server delivers to a private address only with MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS=true"
    return f"{error[:300]} (is `python -m steps.webhook serve` running at that address?)"


def unregister_webhook(tracking: TrackingSettings, webhook: WebhookSettings, name: str = WEBHOOK_NAME) -> list[str]:
    """Delete every webhook called ``name``, each call tried on up to ``webhook.tries`` connections (on a server
    whose workers have different keys, one that can read the secret does it); returns their ids."""
    try:
        hooks = webhooks_named(tracking, name, webhook.tries)
        for hook in hooks:
            _delete(tracking, hook, webhook.tries)
    except MlflowException as exc:
        raise refused(exc, "its receiver") from None
    return [hook.webhook_id for hook in hooks]


def unregister_in_database(backend_store_uri: str, name: str = WEBHOOK_NAME) -> list[str]:
    """Delete the webhooks called ``name`` in the tracking server's database as MLflow's delete does (it sets
    ``deleted_timestamp``), without reading their encrypted secrets, which every API call does: the way out when
    no worker can decrypt them any more (a restart without MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY, or with another
    one). Returns their ids."""
    live: sqlalchemy.ColumnElement[bool] = (SqlWebhook.name == name) & SqlWebhook.deleted_timestamp.is_(None)
    now = get_current_time_millis()
    engine = sqlalchemy.create_engine(database_url("--backend-store-uri", backend_store_uri))
    try:
        with engine.begin() as connection:
            ids = list(connection.scalars(sqlalchemy.select(SqlWebhook.webhook_id).where(live)))
            connection.execute(
                sqlalchemy.update(SqlWebhook).where(live).values(deleted_timestamp=now, last_updated_timestamp=now)
            )
    except sqlalchemy.exc.SQLAlchemyError as exc:
        raise TrackingError(f"cannot remove the webhook through {redact(backend_store_uri)}: {reason(exc)}") from None
    finally:
        engine.dispose()
    return ids
