"""UI promotion that reaches the Lambda by itself: the receiver (`python -m steps.webhook serve`) reconciles storage
with @champion on a timer, and MLflow's registry webhook, signed, makes it look sooner. Against real `mlflow server`s
(SQLite and PostgreSQL with one worker; SQLite with the default 4 workers, with and without a shared encryption key),
with the receiver as its own process and storage on the moto server; `register` and `unregister` as commands."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import boto3
import pytest
import requests
from cryptography.fernet import Fernet
from mlflow import MlflowClient
from mlflow.entities.webhook import WebhookEvent
from mlflow.exceptions import MlflowException

from agnews.config import PROJECT_ROOT, compose
from agnews.names import CANDIDATE, CHALLENGER, CHAMPION, PREVIOUS, PROMOTED_BY
from agnews.names import WEBHOOK_KEY_ENV as KEY_ENV
from agnews.names import WEBHOOK_SECRET_ENV as SECRET_ENV
from agnews.promotion.mirror import promotion_history
from agnews.promotion.receiver import signature
from agnews.promotion.register import register
from agnews.promotion.registry import aliases
from agnews.promotion.webhook_admin import EVENTS, WEBHOOK_NAME, refused
from agnews.settings import Settings
from agnews.tracking import step_run
from bundle.layout import POINTER
from tests.helpers import SEED_TEXT, Sequence, TrainRuns, WebhookReceiver, checkout, readme_sequence, run_as_written

pytestmark = pytest.mark.promotion  # make test-promotion

GATE_OPEN = ["registry.min_accuracy=0", "registry.min_behaviour_pass_rate=0"]
DEADLINE_S = 60  # how long the receiver may take to mirror after the alias moved


def model_config(tracking_uri: str, bucket: str, name: str, *overrides: str) -> Settings:
    return compose(
        [
            f"tracking.uri={tracking_uri}",
            "tracking.experiment=registry-tests",
            f"storage.uri=s3://{bucket}",
            f"registry.model_name={name}",
            *overrides,
        ]
    )


def run_register(cfg: Settings):
    with step_run(cfg, "register"):
        return register(cfg.registry, cfg.storage, cfg.tracking.experiment, cfg.registry.run_id)


def pointer(bucket: str, name: str) -> dict | None:
    s3 = boto3.client("s3", endpoint_url=os.environ["S3_ENDPOINT_URL"])
    try:
        body = s3.get_object(Bucket=bucket, Key=f"models/{name}/{POINTER}")["Body"].read()
    except s3.exceptions.NoSuchKey:
        return None
    return json.loads(body)


def wait_for_pointer(
    bucket: str, name: str, version: int, receiver: WebhookReceiver | Sequence, within_s: float = DEADLINE_S
) -> dict:
    """Poll champion.json until it names ``version``; fail after ``within_s`` with the receiver's log."""
    deadline = time.monotonic() + within_s
    while (found := pointer(bucket, name)) is None or found["version"] != version:
        if time.monotonic() > deadline:
            pytest.fail(f"champion.json still names {found} after {within_s}s:\n{receiver.output()[-3000:]}")
        time.sleep(0.2)
    return found


def wait_for_candidate(bucket: str, name: str, version: int | None, receiver: WebhookReceiver) -> dict:
    """Poll champion.json until its candidate is ``version`` (None: it has none); fail after DEADLINE_S."""
    deadline = time.monotonic() + DEADLINE_S
    while (found := pointer(bucket, name) or {}).get("candidate", {}).get("version") != version:
        if time.monotonic() > deadline:
            pytest.fail(f"champion.json is still {found} after {DEADLINE_S}s:\n{receiver.output()[-3000:]}")
        time.sleep(0.2)
    return found


def health(receiver: WebhookReceiver) -> dict:
    return requests.get(f"{receiver.url}health", timeout=10).json()


def health_once_served(url: str, version: int, within_s: float = DEADLINE_S) -> dict:
    """The receiver at ``url``'s /health once it reports ``version`` served: the reconcile writes champion.json a
    moment before it records its outcome, so the report may lag the pointer that wait_for_pointer saw."""
    deadline = time.monotonic() + within_s
    served = {"registry": version, "served": version}
    while (report := requests.get(f"{url}health", timeout=10).json())["champion"] != served:
        if time.monotonic() > deadline:
            pytest.fail(f"/health still reports {report['champion']} after {within_s}s: {report}")
        time.sleep(0.2)
    return report


def move_champion(tracking_uri: str, name: str, version: int) -> None:
    """Set @champion as the UI does when an alias is saved (its own REST call)."""
    moved = requests.post(
        f"{tracking_uri}/ajax-api/2.0/mlflow/registered-models/alias",
        json={"name": name, "alias": CHAMPION, "version": str(version)},
        timeout=30,
    )
    moved.raise_for_status()


def champion_and_challenger(runs: TrainRuns, bucket: str, name: str) -> None:
    """v1 @champion by the gate (and mirrored), v2 @challenger (rejected by a strict gate)."""
    promoted = run_register(model_config(runs.tracking_uri, bucket, name, *GATE_OPEN, f"registry.run_id={runs.good}"))
    assert promoted.version == 1 and promoted.promoted
    strict = ["registry.min_accuracy=0.99", f"registry.run_id={runs.worse}"]
    rejected = run_register(model_config(runs.tracking_uri, bucket, name, *strict))
    assert (rejected.version, rejected.alias) == (2, CHALLENGER)
    assert pointer(bucket, name)["version"] == 1


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
    webhook_receiver: Callable[[Settings], WebhookReceiver],
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
    champion_and_challenger(runs, bucket, name)
    invoke = serve(f"s3://{bucket}/models/{name}", MODEL_REFRESH_SECONDS="0")
    assert invoke({"text": SEED_TEXT})["body"]["model_version"] == 1

    move_champion(runs.tracking_uri, name, 2)
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
    assert "@champion of" in log and "moved to v2" in log and "reconcile (delivery): mirrored @champion v2" in log
    assert health(receiver)["deliveries"]["accepted"] >= 1
    cfg = model_config(runs.tracking_uri, bucket, name)
    moves = [(e.to.version, e.how, e.via) for e in reversed(promotion_history(cfg.registry, cfg.storage))]
    assert moves == [(1, "gate", "register"), (2, "ui", "delivery"), (1, "rollback", "register")]


def test_the_receiver_refuses_forged_and_stale_deliveries_and_ignores_other_events(
    mlflow_server: str, webhook_receiver: Callable[[Settings], WebhookReceiver], s3_env: str, bucket: str
) -> None:
    name = f"guarded-{uuid.uuid4().hex[:8]}"
    receiver = webhook_receiver(model_config(mlflow_server, bucket, name))

    def post(**kwargs) -> requests.Response:
        return requests.post(receiver.url, timeout=10, **kwargs)

    tested = health(receiver)["deliveries"]  # the set-up's test deliveries, answered "ignored"
    assert set(tested) == {"ignored"}
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
    assert health(receiver)["deliveries"] == tested | {"refused": 4}, "nothing accepted"
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
    assert "accepted" not in health(receiver)["deliveries"]

    first = delivery(receiver.secret, event)
    assert post(**first).status_code == 202
    again = post(**first)  # MLflow retries with the same delivery id
    assert (again.status_code, again.json()["status"]) == (200, "duplicate")
    assert health(receiver)["deliveries"]["accepted"] == 1
    assert post(data=b"{}", headers={"X-MLflow-Delivery-Id": "x"}).status_code == 401
    assert requests.put(receiver.url, timeout=10).status_code == 405


# ---- Level-triggered: a server with its default workers, sharing the encryption key ----

INTERVAL_S = 10  # the receivers' reconcile interval in these tests (30 s by default)


def test_a_move_made_while_the_receiver_was_down_is_served_within_one_interval(
    keyed_runs: TrainRuns, webhook_receiver: Callable[..., WebhookReceiver], s3_env: str, bucket: str
) -> None:
    """@champion moved to v2 through the UI's REST call with no receiver running: nothing delivers it, storage keeps
    v1. The receiver, started afterwards, serves v2 within one interval and says so on /health."""
    name = f"down-{uuid.uuid4().hex[:8]}"
    champion_and_challenger(keyed_runs, bucket, name)
    move_champion(keyed_runs.tracking_uri, name, 2)
    assert pointer(bucket, name)["version"] == 1, "no receiver: nothing moved storage"

    receiver = webhook_receiver(
        model_config(keyed_runs.tracking_uri, bucket, name, f"webhook.reconcile_s={INTERVAL_S}")
    )
    wait_for_pointer(bucket, name, 2, receiver, within_s=INTERVAL_S)
    client = MlflowClient(keyed_runs.tracking_uri)
    assert aliases(client, name) == {CHAMPION: 2, PREVIOUS: 1}
    assert client.get_model_version(name, "2").tags[PROMOTED_BY] == "manual"
    report = health_once_served(receiver.url, 2)
    assert report["champion"] == {"registry": 2, "served": 2}
    assert report["last_reconcile"]["ok"] and "mirrored @champion v2" in report["last_reconcile"]["outcome"]
    assert report["seconds_since_agreed"] is not None and report["reconcile_s"] == INTERVAL_S


def test_a_move_whose_deliveries_fail_is_served_by_the_timer(
    keyed_runs: TrainRuns, webhook_receiver: Callable[..., WebhookReceiver], s3_env: str, bucket: str
) -> None:
    """A webhook with the wrong secret (a set-up made by hand): the server's every delivery is refused with a 401,
    which MLflow does not retry. The receiver's timer serves the move all the same, and /health counts the refusals."""
    name = f"deaf-{uuid.uuid4().hex[:8]}"
    champion_and_challenger(keyed_runs, bucket, name)
    cfg = model_config(keyed_runs.tracking_uri, bucket, name, f"webhook.reconcile_s={INTERVAL_S}")
    receiver = webhook_receiver(cfg, register=False)
    client = MlflowClient(keyed_runs.tracking_uri)
    hook = client.create_webhook(f"wrong-{name}", receiver.url, list(EVENTS), secret="not-the-receiver-secret")
    try:
        move_champion(keyed_runs.tracking_uri, name, 2)
        wait_for_pointer(bucket, name, 2, receiver, within_s=2 * INTERVAL_S + DEADLINE_S)
        deadline = time.monotonic() + DEADLINE_S
        while "refused" not in health(receiver)["deliveries"]:
            assert time.monotonic() < deadline, f"the delivery never came: {health(receiver)}"
            time.sleep(0.2)
    finally:
        client.delete_webhook(hook.webhook_id)
    log = receiver.output()
    assert "refused a delivery: the signature does not match" in log
    assert "reconcile (timer): mirrored @champion v2" in log
    assert "accepted" not in health(receiver)["deliveries"]
    newest = promotion_history(cfg.registry, cfg.storage)[0]
    assert (newest.to.version, newest.how, newest.via) == (2, "ui", "timer"), "a UI move, learned of by the timer"


# ---- Set-up that can't half-work: `register` and `unregister` against 4-worker servers ----


def webhook_command(
    tracking_uri: str, *args: str, secret: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """`python -m steps.webhook <args>` against ``tracking_uri``. Its timeout is also the bound on "fails in
    seconds": MLflow's client, retrying a 500, would take minutes."""
    inherited = {k: v for k, v in os.environ.items() if k not in (SECRET_ENV, KEY_ENV, "MLFLOW_TRACKING_URI")}
    settings = [f"tracking.uri={tracking_uri}", "tracking.experiment=registry-tests"]
    return subprocess.run(
        [sys.executable, "-m", "steps.webhook", *args, *settings],
        cwd=PROJECT_ROOT,
        env=inherited | (env or {}) | ({SECRET_ENV: secret} if secret else {}),
        capture_output=True,
        text=True,
        timeout=120,
    )


def named(tracking_uri: str) -> list:
    return [hook for hook in MlflowClient(tracking_uri).list_webhooks() if hook.name == WEBHOOK_NAME]


def test_register_tests_the_webhook_on_every_worker_and_unregister_removes_it(
    keyed_mlflow_server: str, webhook_receiver: Callable[..., WebhookReceiver], s3_env: str, bucket: str
) -> None:
    """With the key shared: register succeeds and its test deliveries reach the receiver; a second register with
    another secret fails on the receiver's 401 and leaves the working webhook as it was; unregister removes it, then
    finds none."""
    uri = keyed_mlflow_server
    receiver = webhook_receiver(model_config(uri, bucket, f"setup-{uuid.uuid4().hex[:8]}"), register=False)
    missing = webhook_command(uri, "register", "--url", receiver.url)
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines()[-1] == f"error: the webhook needs a secret: set {SECRET_ENV}"

    done = webhook_command(uri, "register", "--url", receiver.url, secret=receiver.secret)
    assert done.returncode == 0, done.stderr
    assert f"delivers model_version_alias.created, model_version_alias.deleted to {receiver.url}" in done.stdout
    assert health(receiver)["deliveries"]["ignored"] == 8, "every test delivery reached the receiver, signed"
    assert [hook.url for hook in named(uri)] == [receiver.url]

    [working] = named(uri)
    wrong = webhook_command(uri, "register", "--url", receiver.url, secret="another-secret")
    assert wrong.returncode == 1
    last = wrong.stderr.strip().splitlines()[-1]
    assert "the receiver refused its signature" in last, last
    assert last.endswith(f"the webhook was removed; {working.webhook_id} to {receiver.url} left as it was"), last
    assert [hook.webhook_id for hook in named(uri)] == [working.webhook_id], "the new one removed, the old one kept"

    assert webhook_command(uri, "register", "--url", receiver.url, secret=receiver.secret).returncode == 0
    assert [hook.webhook_id for hook in named(uri)] != [working.webhook_id], "tested, then replaced the old one"
    removed = webhook_command(uri, "unregister")
    assert removed.returncode == 0, removed.stderr
    assert removed.stdout.startswith("removed 1 webhook(s)")
    assert named(uri) == []
    assert "none was registered" in webhook_command(uri, "unregister").stdout


def test_a_register_whose_new_url_fails_leaves_the_working_webhook_in_place(
    keyed_mlflow_server: str, webhook_receiver: Callable[..., WebhookReceiver], s3_env: str, bucket: str
) -> None:
    """`register --url http://127.0.0.1:1/` (nothing listens there) against a server whose webhook works: the new URL
    is tested before the existing webhook is touched, the command fails in one line, and the existing webhook is
    still there and still delivers."""
    uri = keyed_mlflow_server
    receiver = webhook_receiver(model_config(uri, bucket, f"kept-{uuid.uuid4().hex[:8]}"), register=False)
    assert webhook_command(uri, "register", "--url", receiver.url, secret=receiver.secret).returncode == 0
    try:
        [working] = named(uri)
        moved = webhook_command(uri, "register", "--url", "http://127.0.0.1:1/", secret=receiver.secret)
        assert moved.returncode == 1
        last = moved.stderr.strip().splitlines()[-1]
        assert last.startswith("error: a test delivery to http://127.0.0.1:1/ failed: "), last
        assert last.endswith(f"{working.webhook_id} to {receiver.url} left as it was"), last
        assert [(hook.webhook_id, hook.url) for hook in named(uri)] == [(working.webhook_id, receiver.url)]
        before = health(receiver)["deliveries"]["ignored"]
        assert MlflowClient(uri).test_webhook(working.webhook_id).success, "the kept webhook still delivers"
        assert health(receiver)["deliveries"]["ignored"] == before + 1
    finally:
        webhook_command(uri, "unregister")


def test_register_refuses_a_server_whose_workers_do_not_share_the_key_and_unregister_still_works(
    keyless_mlflow_server: str, webhook_receiver: Callable[..., WebhookReceiver], s3_env: str, bucket: str
) -> None:
    """No MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY on a 4-worker server: register fails in seconds naming the key, and
    removes its webhook; one made by hand on such a server (the state that used to need SQL) unregisters."""
    uri = keyless_mlflow_server
    receiver = webhook_receiver(model_config(uri, bucket, f"keyless-{uuid.uuid4().hex[:8]}"), register=False)
    refused = webhook_command(uri, "register", "--url", receiver.url, secret=receiver.secret)
    assert refused.returncode == 1
    last = refused.stderr.strip().splitlines()[-1]
    assert "cannot decrypt the webhook secrets it stores" in last and f"the same {KEY_ENV}" in last, last
    assert last.endswith("; the webhook was removed"), last
    assert named(uri) == [], "the half-working webhook was removed"

    MlflowClient(uri).create_webhook(WEBHOOK_NAME, receiver.url, list(EVENTS), secret=receiver.secret)
    removed = webhook_command(uri, "unregister")
    assert removed.returncode == 0, removed.stderr
    assert removed.stdout.startswith("removed 1 webhook(s)") and named(uri) == []


@pytest.mark.integration
@pytest.mark.parametrize("key", [None, "set"])
def test_register_without_a_tracking_server_says_webhooks_need_one(key: str | None, tmp_path: Path) -> None:
    """A tracking URI that is a local store (SQLite, as without MLFLOW_TRACKING_URI): one line that says webhooks need
    a tracking server and names the URI, with or without the encryption key, not a decryption failure."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {KEY_ENV: Fernet.generate_key().decode()} if key else {}
    done = webhook_command(uri, "register", "--url", "http://127.0.0.1:9/", secret="s", env=env)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "error: webhooks need a tracking server (`mlflow server`; set MLFLOW_TRACKING_URI or tracking.uri to its "
        f"http(s) address): the tracking URI is {uri}"
    ]


@pytest.mark.parametrize(
    ("url", "setting"),
    [
        ("http://127.0.0.1:9/", "MLFLOW_WEBHOOK_ALLOWED_SCHEMES=http,https"),
        ("https://127.0.0.1:9/", "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS=true"),
    ],
)
def test_a_refused_url_names_the_server_setting_that_allows_it(
    url: str, setting: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MLflow's own check of a webhook URL, as a server with its defaults runs it; the error names the one setting."""
    from mlflow.utils.validation import _validate_webhook_url

    for name in ("MLFLOW_WEBHOOK_ALLOWED_SCHEMES", "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(MlflowException) as refusal:
        _validate_webhook_url(url)
    message = str(refused(refusal.value, url))
    assert message.endswith(setting) and message.startswith(f"the tracking server refused the webhook to {url}")


@pytest.mark.integration
def test_unregister_through_the_database_when_no_worker_can_decrypt_the_secret(
    mlflow_db, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The state after a restart with another key (or none): every webhook call, delete included, decrypts the
    secret and fails. `unregister --backend-store-uri` removes the webhook without reading it."""
    from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore

    db = tmp_path / "mlflow.db"
    shutil.copy(mlflow_db, db)
    uri = f"sqlite:///{db}"
    monkeypatch.setenv("MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS", "true")
    store = SqlAlchemyStore(uri)  # encrypts with this process's key: another process has another one
    hook = store.create_webhook(WEBHOOK_NAME, "https://127.0.0.1:9/", [WebhookEvent.from_str(EVENTS[0])], secret="s")
    other_process = (
        "from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore as S; "
        f"S({uri!r}).delete_webhook({hook.webhook_id!r})"
    )
    env = {k: v for k, v in os.environ.items() if k != KEY_ENV}
    stuck = subprocess.run([sys.executable, "-c", other_process], env=env, capture_output=True, text=True, timeout=300)
    assert stuck.returncode != 0 and "InvalidToken" in stuck.stderr, "MLflow's own delete needs the key"

    done = subprocess.run(
        [sys.executable, "-m", "steps.webhook", "unregister", "--backend-store-uri", uri],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"removed 1 webhook(s) from {uri}: {hook.webhook_id}"
    assert list(store.list_webhooks()) == []


def test_the_readmes_webhook_setup_as_written_serves_a_move_made_in_the_ui(
    keyed_runs: TrainRuns, s3_env: str, bucket: str, tmp_path: Path
) -> None:
    """README, "Promote in the MLflow UI": its webhook block, as written, in a checkout, against a server with its
    default 4 workers and the three settings. The receiver it leaves running serves @champion moved with the UI's own
    call, on a delivery from the webhook it registered (not only the timer)."""
    name = compose([]).registry.model_name  # the block runs on conf/'s defaults
    champion_and_challenger(keyed_runs, bucket, name)
    env = {k: v for k, v in os.environ.items() if k != SECRET_ENV}
    env |= {"MLFLOW_TRACKING_URI": keyed_runs.tracking_uri, "S3_BUCKET": bucket}
    try:
        with run_as_written(readme_sequence("webhook-setup"), checkout(tmp_path), env) as done:
            assert done.returncode == 0, done.output()[-4000:]
            assert len(named(keyed_runs.tracking_uri)) == 1
            move_champion(keyed_runs.tracking_uri, name, 2)
            wait_for_pointer(bucket, name, 2, done)
            report = health_once_served("http://localhost:8088/", 2)
            assert report["deliveries"]["accepted"] >= 1 and report["champion"] == {"registry": 2, "served": 2}
    finally:
        webhook_command(keyed_runs.tracking_uri, "unregister")
    assert not named(keyed_runs.tracking_uri)
    assert aliases(MlflowClient(keyed_runs.tracking_uri), name) == {CHAMPION: 2, PREVIOUS: 1}


# Alias moves on connections of their own before the webhook exists: all 4 workers see one but in 4 * 0.75^32 = 4e-4.
WARM_UP_MOVES = 32


def test_a_move_right_after_register_is_delivered_by_a_server_started_as_the_readme_says(
    webhook_receiver: Callable[..., WebhookReceiver], s3_env: str, bucket: str, tmp_path: Path
) -> None:
    """MLflow's workers cache the webhooks of each event for MLFLOW_WEBHOOK_CACHE_TTL seconds (60 by default) from
    the first event they deliver. A server started by the README's `ui-server` block, as written, whose workers
    have all seen an alias move before the webhook was registered: a move of @champion right after `register` is
    delivered (and so mirrored before the receiver's timer, set to 10 minutes here, would)."""
    root = checkout(tmp_path)
    (root / "mlflow").mkdir(exist_ok=True)
    with run_as_written(readme_sequence("ui-server"), root) as started:
        assert started.returncode == 0, started.output()[-3000:]
        uri, name = "http://127.0.0.1:5000", f"cached-{uuid.uuid4().hex[:8]}"
        client = MlflowClient(uri)
        client.create_registered_model(name)
        for _ in range(2):
            client.create_model_version(name, source=f"s3://{bucket}/nothing-to-serve")
        for _ in range(WARM_UP_MOVES):  # each on a connection of its own, so that every worker delivers one
            moved = requests.post(
                f"{uri}/api/2.0/mlflow/registered-models/alias",
                json={"name": name, "alias": CHALLENGER, "version": "2"},
                headers={"Connection": "close"},
                timeout=30,
            )
            moved.raise_for_status()
        receiver = webhook_receiver(model_config(uri, bucket, name, "webhook.reconcile_s=600"), register=False)
        try:
            registered = webhook_command(uri, "register", "--url", receiver.url, secret=receiver.secret)
            assert registered.returncode == 0, registered.stderr
            move_champion(uri, name, 1)
            deadline = time.monotonic() + DEADLINE_S / 2  # well inside the 60 s that a cached empty list lasts
            while health(receiver)["deliveries"].get("accepted", 0) == 0:
                assert time.monotonic() < deadline, f"the move was not delivered: {health(receiver)}"
                time.sleep(0.2)
        finally:
            webhook_command(uri, "unregister")


def test_a_candidate_set_and_deleted_in_the_registry_reaches_champion_json(
    train_runs: TrainRuns, webhook_receiver: Callable[[Settings], WebhookReceiver], s3_env: str, bucket: str
) -> None:
    """@candidate set on v2 (as the UI does, without the rollout step's tags): the receiver serves it beside v1 as a
    shadow; @candidate deleted: the candidate leaves champion.json. Both from deliveries, both in the history."""
    name = f"candidate-{uuid.uuid4().hex[:8]}"
    receiver = webhook_receiver(model_config(train_runs.tracking_uri, bucket, name, *GATE_OPEN))
    champion_and_challenger(train_runs, bucket, name)
    client = MlflowClient(train_runs.tracking_uri)
    client.set_registered_model_alias(name, CANDIDATE, "2")
    served = wait_for_candidate(bucket, name, 2, receiver)
    assert served["version"] == 1 and served["candidate"]["mode"] == "shadow"
    client.delete_registered_model_alias(name, CANDIDATE)
    assert wait_for_candidate(bucket, name, None, receiver)["version"] == 1
    cfg = model_config(train_runs.tracking_uri, bucket, name)
    entries = promotion_history(cfg.registry, cfg.storage)
    steps = [(e.to.version, e.candidate and e.candidate.version, e.how) for e in entries]
    assert steps[::-1] == [(1, None, "gate"), (1, 2, "shadow"), (1, None, "abort")]
    assert "@candidate of" in receiver.output()
