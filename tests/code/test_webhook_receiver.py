"""The webhook receiver's HTTP side, against hostile clients: bodies bounded before they are read, headers parsed
defensively, deep nesting, stalled clients. The receiver runs as its own process (`python -m steps.webhook serve`,
on waitress), with local storage and a SQLite tracking store; it prints its address before it loads anything."""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlsplit

import psutil
import pytest
import requests

from agnews.config import PROJECT_ROOT
from agnews.names import WEBHOOK_SECRET_ENV as SECRET_ENV
from agnews.promotion.receiver import MAX_DELIVERY_BYTES, signature
from tests.helpers import WEBHOOK_START_S, start_receiver, stop_receiver

pytestmark = pytest.mark.integration  # each test serves a receiver

SECRET = "receiver-tests"
READ_TIMEOUT_S = 1
STALLED = 50
CLOSED_WITHIN_S = 30  # a deadline for the stalled sockets to be closed, far beyond the 1s read timeout


@dataclass(frozen=True)
class Served:
    """A running `python -m steps.webhook serve`: its port and process."""

    port: int
    process: subprocess.Popen

    def health(self) -> dict:
        return requests.get(f"http://127.0.0.1:{self.port}/health", timeout=10).json()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """The receiver as its own process (read timeout 1 s), on local storage and a SQLite tracking store."""
    root = tmp_path_factory.mktemp("receiver")
    overrides = [
        f"storage.uri={root / 'store'}",
        f"tracking.uri=sqlite:///{root / 'mlflow.db'}",
        f"webhook.read_timeout_s={READ_TIMEOUT_S}",
    ]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {SECRET_ENV: SECRET}
    # in its own folder: MLflow's default experiment keeps its artifacts under ./mlruns
    process, url = start_receiver(overrides, env, root / "receiver.log", cwd=root)
    yield Served(urlsplit(url).port, process)
    stop_receiver(process)


def raw(port: int, request: bytes) -> bytes:
    """The status line that the receiver answers ``request`` with (b'' when it closes the connection)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.sendall(request)
        return conn.recv(4096).split(b"\r\n")[0]


def signed(body: bytes, timestamp: str | None = None) -> dict[str, str]:
    delivery_id, stamp = str(uuid.uuid4()), timestamp or str(int(time.time()))
    return {
        "X-MLflow-Delivery-Id": delivery_id,
        "X-MLflow-Timestamp": stamp,
        "X-MLflow-Signature": signature(SECRET, delivery_id, stamp, body),
    }


@pytest.mark.parametrize(
    ("length", "status"),
    [
        (None, b"411"),  # no length: nothing to bound the read by
        ("-1", b"400"),  # read(-1) would read to the end of the stream
        ("-100000000000000000000", b"400"),
        ("1e3", b"400"),
        (str(MAX_DELIVERY_BYTES + 1), b"413"),  # refused before the body is sent
        (str(10**30), b"413"),
        ("9" * 4400, b"431"),  # more digits than int() takes: the headers are refused whole
    ],
)
def test_a_body_is_bounded_before_it_is_read(served: Served, length: str | None, status: bytes) -> None:
    header = f"Content-Length: {length}\r\n" if length is not None else ""
    answer = raw(served.port, f"POST / HTTP/1.1\r\nHost: x\r\n{header}\r\n".encode())
    assert answer.split()[1] == status, answer
    assert "accepted" not in served.health()["deliveries"]


def test_malformed_headers_and_deep_nesting_get_a_4xx_not_a_500(served: Served) -> None:
    refused = served.health()["deliveries"].get("refused", 0)
    url = f"http://127.0.0.1:{served.port}/"
    body = b"{}"
    long_stamp = requests.post(url, data=body, headers=signed(body, "9" * 3000), timeout=30)
    assert long_stamp.status_code == 401 and "is not Unix seconds" in long_stamp.json()["error"]
    too_long = requests.post(url, data=body, headers=signed(body, "9" * 4400), timeout=30)
    assert too_long.status_code == 431  # refused by waitress before any header is parsed, so not counted
    nested = b"[" * 100_000 + b"]" * 100_000
    deep = requests.post(url, data=nested, headers=signed(nested), timeout=30)
    assert deep.status_code == 400 and "nested too deeply" in deep.json()["error"]
    unicode_digits = requests.post(
        url, data=body, headers={**signed(body), "X-MLflow-Timestamp": "١٢٣".encode()}, timeout=30
    )
    assert unicode_digits.status_code == 401
    assert served.health()["deliveries"]["refused"] == refused + 3


def test_stalled_clients_hold_no_thread_and_are_closed_after_the_read_timeout(served: Served) -> None:
    """50 clients that send half a request and stop: no thread each, a normal request still answers, and each
    stalled connection is closed once it has been silent for the read timeout."""
    port, process = served.port, psutil.Process(served.process.pid)
    threads = process.num_threads()
    stalled = [socket.create_connection(("127.0.0.1", port), timeout=CLOSED_WITHIN_S) for _ in range(STALLED)]
    try:
        for conn in stalled:
            conn.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")  # 99 bytes never come
        assert served.health()["status"] == "ok"
        assert process.num_threads() <= threads, "no thread per stalled client"
        for conn in stalled:
            assert conn.recv(4096) == b"", "closed by the receiver, with nothing sent"
    finally:
        for conn in stalled:
            conn.close()


def test_serve_prints_its_address_before_it_loads_anything(tmp_path) -> None:
    """The address comes first, before the tracking server is even contacted: here there is none, and the command
    then fails with that cause."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {SECRET_ENV: SECRET}
    done = subprocess.run(
        [sys.executable, "-m", "steps.webhook", "serve", "--port", "0", "tracking.uri=http://127.0.0.1:9"],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1
    first = done.stdout.splitlines()[0]
    assert first.startswith("webhook receiver listening on http://127.0.0.1:") and first.endswith("/ (starting)")
    assert done.stderr.strip().splitlines()[-1].startswith("error: no MLflow tracking server at http://127.0.0.1:9")


def test_health_reports_the_reconcile(served: Served) -> None:
    """With nothing registered: the reconcile ran, found no @champion, and says so; no agreement yet."""
    deadline = time.monotonic() + WEBHOOK_START_S
    while (health := served.health())["last_reconcile"] is None:
        assert time.monotonic() < deadline, health
        time.sleep(0.2)
    assert health["last_reconcile"]["ok"] is True
    assert "has no @champion" in health["last_reconcile"]["outcome"]
    assert health["champion"] == {"registry": None, "served": None}
    assert health["seconds_since_agreed"] is None


def test_serve_on_a_port_in_use_fails_with_one_line(served: Served) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "steps.webhook", "serve", "--port", str(served.port)],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith(f"error: cannot listen on 127.0.0.1:{served.port}: Address already in use")
    assert len(done.stderr.strip().splitlines()) == 1


def reconciled(url: str) -> bool:
    """Whether the receiver at ``url`` (its /health) answers, whatever its status, with a reconcile behind it."""
    try:
        return requests.get(url, timeout=2).json()["last_reconcile"] is not None
    except requests.RequestException:
        return False


def test_health_is_degraded_with_503_while_storage_fails_and_ok_once_it_recovers(tmp_path) -> None:
    """Storage that refuses every write (a file where its models folder should be): each reconcile fails to take the
    model's lease, and /health says so with HTTP 503; once storage works again, the next reconcile makes it 200."""
    store = tmp_path / "store"
    store.mkdir()
    (store / "models").write_text("a file where the models folder should be")
    overrides = [f"storage.uri={store}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "webhook.reconcile_s=1"]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {SECRET_ENV: SECRET}
    process, url = start_receiver(overrides, env, tmp_path / "receiver.log", cwd=tmp_path, ready=reconciled)
    try:
        answer = requests.get(f"{url}health", timeout=10)
        assert answer.status_code == 503, answer.json()
        report = answer.json()
        assert report["status"] == "degraded" and report["degraded"].startswith("the last reconcile failed: ")
        assert "cannot" in report["last_reconcile"]["outcome"]

        (store / "models").unlink()
        deadline = time.monotonic() + WEBHOOK_START_S
        while (answer := requests.get(f"{url}health", timeout=10)).status_code != 200:
            assert time.monotonic() < deadline, answer.json()
            time.sleep(0.2)
        assert answer.json()["status"] == "ok" and answer.json()["last_reconcile"]["ok"]
    finally:
        stop_receiver(process)


STARVING = 1_000  # stalled connections, ten times the receiver's connection limit


def test_health_answers_while_a_thousand_stalled_clients_hold_connections(tmp_path) -> None:
    """1,000 loopback clients that send half a request and stop, against a receiver with its default connection
    limit (100) and read timeout (10 s): /health still answers, within its client's 10 s timeout. Where the server
    stops accepting at its limit, the request waits behind the stalled ones for a read timeout per hundred."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < STARVING + 200:
        pytest.skip(f"{STARVING} sockets need more open files than this process may have ({hard})")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4 * STARVING)), hard))
    overrides = [f"storage.uri={tmp_path / 'store'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | {SECRET_ENV: SECRET}
    process, url = start_receiver(overrides, env, tmp_path / "receiver.log", cwd=tmp_path)
    port = urlsplit(url).port
    stalled: list[socket.socket] = []
    try:
        for _ in range(STARVING):
            conn = socket.create_connection(("127.0.0.1", port), timeout=10)
            stalled.append(conn)
            conn.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")  # 99 bytes never come
        answer = requests.get(f"{url}health", timeout=10)
        assert answer.status_code == 200 and answer.json()["status"] == "ok"
    finally:
        for conn in stalled:
            conn.close()
        stop_receiver(process)


def test_serve_on_a_port_out_of_range_fails_with_one_line() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "steps.webhook", "serve", "--port", "99999"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.splitlines() == ["error: cannot listen on 127.0.0.1:99999: bind(): port must be 0-65535."]
