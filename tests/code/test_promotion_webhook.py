"""UI promotion that reaches the Lambda by itself: MLflow's registry webhook delivers @champion moves, signed, to the
receiver (`python -m steps.webhook serve`), which checks them and runs the mirror. Against a real `mlflow server`
on SQLite and on PostgreSQL, with the receiver as its own process and storage on the moto server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING

import boto3
import pytest
import requests
from mlflow import MlflowClient
from omegaconf import DictConfig

from agnews.config import PROJECT_ROOT, compose
from agnews.promotion import register
from agnews.registry import CHALLENGER, CHAMPION, PREVIOUS, PROMOTED_BY, aliases
from agnews.tracking import step_run
from agnews.webhooks import SECRET_ENV, signature
from bundle.layout import POINTER
from tests.helpers import SEED_TEXT

if TYPE_CHECKING:
    from tests.conftest import TrainRuns, WebhookReceiver

GATE_OPEN = ["registry.min_accuracy=0", "registry.min_behaviour_pass_rate=0"]
DEADLINE_S = 60  # how long the receiver may take to mirror after the alias moved


def model_config(tracking_uri: str, bucket: str, name: str, *overrides: str) -> DictConfig:
    return compose(
        [
            f"tracking.uri={tracking_uri}",
            "tracking.experiment=registry-tests",
            f"storage.uri=s3://{bucket}",
            f"registry.model_name={name}",
            *overrides,
        ]
    )


def run_register(cfg: DictConfig):
    with step_run(cfg, "register"):
        return register(cfg)


def pointer(bucket: str, name: str) -> dict | None:
    s3 = boto3.client("s3", endpoint_url=os.environ["S3_ENDPOINT_URL"])
    try:
        body = s3.get_object(Bucket=bucket, Key=f"models/{name}/{POINTER}")["Body"].read()
    except s3.exceptions.NoSuchKey:
        return None
    return json.loads(body)


def wait_for_pointer(bucket: str, name: str, version: int, receiver: WebhookReceiver) -> dict:
    """Poll champion.json until it names ``version``; fail after DEADLINE_S with the receiver's log."""
    deadline = time.monotonic() + DEADLINE_S
    while (found := pointer(bucket, name)) is None or found["version"] != version:
        if time.monotonic() > deadline:
            pytest.fail(f"champion.json still names {found} after {DEADLINE_S}s:\n{receiver.output()[-3000:]}")
        time.sleep(0.2)
    return found


def delivery(secret: str, body: dict, *, timestamp: int | None = None, delivery_id: str | None = None) -> dict:
    """The headers and body of a delivery as MLflow signs it."""
    data = json.dumps(body).encode()
    delivery_id = delivery_id or str(uuid.uuid4())
    stamp = str(int(time.time()) if timestamp is None else timestamp)
    headers = {
        "Content-Type": "application/json",
        "X-MLflow-Delivery-Id": delivery_id,
        "X-MLflow-Timestamp": stamp,
        "X-MLflow-Signature": signature(secret, delivery_id, stamp, data),
    }
    return {"headers": headers, "data": data}


def alias_event(name: str, alias: str = CHAMPION, version: str = "2", action: str = "created") -> dict:
    data = {"name": name, "alias": alias} | ({"version": version} if action == "created" else {})
    return {"entity": "model_version_alias", "action": action, "timestamp": "2026-01-01T00:00:00+00:00", "data": data}


def test_champion_moved_through_the_rest_api_reaches_storage_and_the_lambda(
    registry_backend: TrainRuns,
    webhook_receiver: Callable[[DictConfig], WebhookReceiver],
    serve,
    s3_env: str,
    bucket: str,
) -> None:
    """v1 @champion by the gate, v2 @challenger; then @champion set on v2 with the UI's own call. Within seconds
    champion.json names v2, v1 is @previous, v2 is tagged promoted_by=manual, the Lambda answers with v2, and
    registry.rollback=true returns to v1."""
    runs = registry_backend
    name = f"hooked-{uuid.uuid4().hex[:8]}"
    receiver = webhook_receiver(model_config(runs.tracking_uri, bucket, name, *GATE_OPEN))
    promoted = run_register(model_config(runs.tracking_uri, bucket, name, *GATE_OPEN, f"registry.run_id={runs.good}"))
    assert promoted.version == 1 and promoted.promoted
    strict = ["registry.min_accuracy=0.99", f"registry.run_id={runs.worse}"]
    rejected = run_register(model_config(runs.tracking_uri, bucket, name, *strict))
    assert (rejected.version, rejected.alias) == (2, CHALLENGER)
    assert wait_for_pointer(bucket, name, 1, receiver)["version"] == 1
    invoke = serve(f"s3://{bucket}/models/{name}", MODEL_REFRESH_SECONDS="0")
    assert invoke({"text": SEED_TEXT})["body"]["model_version"] == 1

    moved = requests.post(  # what the UI sends when an alias is saved
        f"{runs.tracking_uri}/ajax-api/2.0/mlflow/registered-models/alias",
        json={"name": name, "alias": CHAMPION, "version": "2"},
        timeout=30,
    )
    moved.raise_for_status()
    wait_for_pointer(bucket, name, 2, receiver)

    client = MlflowClient(runs.tracking_uri)
    assert aliases(client, name) == {CHAMPION: 2, PREVIOUS: 1}
    assert client.get_model_version(name, "2").tags[PROMOTED_BY] == "manual"
    assert client.get_model_version(name, "2").tags["gate"].startswith("rejected by the production gate")
    assert client.get_model_version(name, "1").tags[PROMOTED_BY] == "gate"
    assert invoke({"text": SEED_TEXT})["body"]["model_version"] == 2

    back = run_register(model_config(runs.tracking_uri, bucket, name, "registry.rollback=true"))
    assert (back.version, back.alias) == (1, CHAMPION)
    assert aliases(client, name) == {CHAMPION: 1, PREVIOUS: 2}
    assert pointer(bucket, name)["version"] == 1
    assert invoke({"text": SEED_TEXT})["body"]["model_version"] == 1
    log = receiver.output()
    assert "@champion of" in log and "moved to v2" in log


def test_the_receiver_refuses_forged_and_stale_deliveries_and_ignores_other_events(
    mlflow_server: str, webhook_receiver: Callable[[DictConfig], WebhookReceiver], s3_env: str, bucket: str
) -> None:
    name = f"guarded-{uuid.uuid4().hex[:8]}"
    receiver = webhook_receiver(model_config(mlflow_server, bucket, name))

    def health() -> dict:
        return requests.get(f"{receiver.url}health", timeout=10).json()

    def post(**kwargs) -> requests.Response:
        return requests.post(receiver.url, timeout=10, **kwargs)

    assert health() | {"accepted": 0, "mirrors": 0} == health()
    event = alias_event(name)
    unsigned = post(json=event)
    assert unsigned.status_code == 401 and "missing" in unsigned.json()["error"]
    forged = post(**delivery("not-the-secret", event))
    assert forged.status_code == 401 and "signature does not match" in forged.json()["error"]
    tampered = delivery(receiver.secret, event)
    tampered["data"] = tampered["data"].replace(b'"2"', b'"3"')
    assert post(**tampered).status_code == 401
    stale = post(**delivery(receiver.secret, event, timestamp=int(time.time()) - 3600))
    assert stale.status_code == 401 and "more than 300s from now" in stale.json()["error"]
    assert health()["accepted"] == 0, "nothing scheduled"
    assert pointer(bucket, name) is None, "nothing mirrored"

    for other, why in [
        (alias_event("another-model"), "model 'another-model'"),
        (alias_event(name, alias="previous"), "alias @previous"),
        (alias_event(name) | {"entity": "model_version"}, "entity 'model_version'"),
    ]:
        answer = post(**delivery(receiver.secret, other))
        assert (answer.status_code, answer.json()["status"]) == (200, "ignored") and why in answer.json()["reason"]
    deleted = post(**delivery(receiver.secret, alias_event(name, action="deleted")))
    assert (deleted.status_code, deleted.json()["status"]) == (200, "noted")
    assert health()["accepted"] == 0

    first = delivery(receiver.secret, event)
    assert post(**first).status_code == 202
    again = post(**first)  # MLflow retries with the same delivery id
    assert (again.status_code, again.json()["status"]) == (200, "duplicate")
    assert health()["accepted"] == 1
    assert post(data=b"{}", headers={"X-MLflow-Delivery-Id": "x"}).status_code == 401
    assert requests.put(receiver.url, timeout=10).status_code == 405


def test_the_webhook_command_registers_and_updates_the_webhook(mlflow_server: str, s3_env: str) -> None:
    """`python -m steps.webhook register`: one webhook of that name, created then pointed elsewhere; no secret, no
    webhook."""
    client = MlflowClient(mlflow_server)
    settings = [f"tracking.uri={mlflow_server}", "tracking.experiment=registry-tests"]

    def command(*args: str, secret: str | None = "s3cret") -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k != SECRET_ENV} | ({SECRET_ENV: secret} if secret else {})
        return subprocess.run(
            [sys.executable, "-m", "steps.webhook", *args, *settings],
            cwd=PROJECT_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    missing = command("register", "--url", "http://127.0.0.1:9/", secret=None)
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines()[-1] == f"error: the webhook needs a secret: set {SECRET_ENV}"
    for url in ("http://127.0.0.1:9/a", "http://127.0.0.1:9/b"):
        done = command("register", "--url", url)
        assert done.returncode == 0, done.stderr
        assert f"delivers model_version_alias.created, model_version_alias.deleted to {url}" in done.stdout
    hooks = [hook for hook in client.list_webhooks() if hook.name == "agnews-promotion"]
    try:
        assert [hook.url for hook in hooks] == ["http://127.0.0.1:9/b"]
        assert sorted(str(e) for e in hooks[0].events) == [
            "model_version_alias.created",
            "model_version_alias.deleted",
        ]
    finally:
        for hook in hooks:
            client.delete_webhook(hook.webhook_id)
    serve = command("serve", "--port", "9", secret=None)
    assert serve.returncode == 1
    assert serve.stderr.strip().splitlines()[-1] == f"error: the webhook receiver needs a secret: set {SECRET_ENV}"
