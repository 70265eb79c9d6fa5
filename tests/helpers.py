"""Plain helpers shared by the tests and their fixtures (no fixtures here: those live in the conftest files)."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

import boto3
import pytest
import requests

from agnews.config import PROJECT_ROOT, compose
from agnews.storage import LocalStorage
from bundle.layout import MANIFEST, POINTER, manifest_bytes, sha256, version_folder


def unavailable(message: str) -> NoReturn:
    """Skip a test whose tool or data this machine lacks; under CI=true, where .ci/run installs everything, fail."""
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


# The local AG News copy that the tests read (see ../shared/data/ag_news/SOURCES.md).
AGNEWS_DIR = Path(os.environ.get("AGNEWS_DIR", PROJECT_ROOT.parent / "shared" / "data" / "ag_news"))


def require_agnews() -> Path:
    """The AG News folder; skipped where it is absent, but a failure under CI."""
    if not (AGNEWS_DIR / "test.csv").is_file():
        message = f"AG News not found at {AGNEWS_DIR} (set AGNEWS_DIR)"
        unavailable(message)
    return AGNEWS_DIR


# Seconds that `python -m steps.webhook serve` may take to answer /health (it loads MLflow and the project first).
WEBHOOK_START_S = 120


def start_receiver(
    overrides: list[str],
    env: dict[str, str],
    log: Path,
    cwd: Path = PROJECT_ROOT,
    ready: Callable[[str], bool] | None = None,
) -> tuple[subprocess.Popen, str]:
    """`python -m steps.webhook serve` on a free port of 127.0.0.1 with ``overrides`` and ``env``, its output in
    ``log``: its process and URL once ``ready(<its /health URL>)`` (default: /health answers 200); the test fails if
    it does not start."""
    port = free_port()
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "steps.webhook", "serve", "--port", str(port), *overrides],
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + WEBHOOK_START_S
    while not (ready or answers)(f"{url}health"):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the webhook receiver did not start: {log.read_text()[-2000:]}")
        time.sleep(0.2)
    return process, url


def stop_receiver(process: subprocess.Popen) -> None:
    """Stop a receiver as Ctrl-C does, or kill it after 30 s."""
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()


# The variables that would point a step at the caller's tracking server, bucket or run instead of its arguments'.
STEP_UNSET = ("MLFLOW_TRACKING_URI", "S3_BUCKET", "MLFLOW_RUN_ID")


def run_step(
    step: str,
    *args: str,
    check: bool = False,
    timeout: float = 300,
    cwd: Path = PROJECT_ROOT,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """``python -m steps.<step> args...`` in a process of its own, from ``cwd`` (the project root), as a user or a
    scheduler runs it, in ``env`` (the environment without ``STEP_UNSET``: the arguments say where it logs and
    stores). ``check``: it must exit 0 (the assertion shows the end of its stderr)."""
    if env is None:
        env = {key: value for key, value in os.environ.items() if key not in STEP_UNSET}
    done = subprocess.run(
        [sys.executable, "-m", f"steps.{step}", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert not check or done.returncode == 0, done.stderr[-3000:]
    return done


class Called(NamedTuple):
    """What a step called in the test's own process (the ``call_step`` fixture) answered: as ``run_step``'s."""

    returncode: int
    stdout: str
    stderr: str


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def moto_environ(endpoint: str) -> dict[str, str]:
    """The variables that point boto3 (ours and MLflow's) at the moto server, with dummy credentials."""
    return {
        "S3_ENDPOINT_URL": endpoint,
        "MLFLOW_S3_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
    }


@contextlib.contextmanager
def s3_environment(moto_server: str) -> Iterator[None]:
    """The moto S3 variables, for fixtures that outlive a test's monkeypatch."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in moto_environ(moto_server).items():
            patch.setenv(name, value)
        for name in ("MLFLOW_TRACKING_URI", "S3_BUCKET", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
            patch.delenv(name, raising=False)
        yield


def use_credentials(monkeypatch: pytest.MonkeyPatch, key: str | None, secret: str | None) -> None:
    """Set (or remove) the environment credentials, and make boto3 read the credential chain afresh."""
    for name, value in {"AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret}.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)  # boto3 caches the credentials it found first


def answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).ok
    except requests.RequestException:
        return False


LAMBDA_DIR = PROJECT_ROOT / "lambda"
MODEL_NAME = "distilbert-agnews"
SEED_TEXT = "Apple reported strong quarterly earnings with iPhone sales up 15%"
LABELS = list(compose().data.labels)  # their one home: conf/data/ag_news.yaml
LAMBDA_ENV = (
    "MODEL_URI",
    "S3_BUCKET",
    "MODEL_PREFIX",
    "MODEL_REFRESH_SECONDS",
    "MODEL_RETRY_SECONDS",
    "MAX_TEXT_CHARS",
    "MAX_BATCH",
    "MODEL_CACHE_DIR",
    "AWS_LAMBDA_FUNCTION_NAME",
    "CAPTURE_RATE",
    "CAPTURE_TEXT",
    "LOG_LEVEL",
)


def lambda_template() -> dict[str, Any]:
    """lambda/template.yaml, read by cfn-lint's loader (which knows ``!Ref`` and ``!Sub``)."""
    from cfnlint.decode import decode  # here, not at the top: every pytest process imports this module

    template, problems = decode(str(LAMBDA_DIR / "template.yaml"))
    assert not problems
    return template


def template_resources() -> dict[str, Any]:
    return lambda_template()["Resources"]


EXISTS = re.compile(r"\{ \$\.\w+ = \*(?: && \$\.\w+ = \*)* \}")  # a pattern that asks only that fields exist
SELECTOR = re.compile(r"\$\.(\w+)")


@dataclass(frozen=True)
class MetricFilter:
    """One of the template's metric filters: the metric it publishes and the line's fields it reads."""

    log_group: object
    pattern: str
    metric: str
    namespace: object
    unit: str
    value: str  # the field that holds the metric's value
    dimensions: dict[str, str]  # each dimension, and the field that holds its value

    @property
    def selected(self) -> set[str]:
        """The fields that the pattern selects."""
        return set(SELECTOR.findall(self.pattern))

    def counts(self, line: dict[str, Any]) -> bool:
        """Whether the filter takes a value from ``line``: its patterns ask only that the fields they select exist
        (``EXISTS``), so a line that holds them all matches."""
        return self.selected <= line.keys()


def metric_filters() -> list[MetricFilter]:
    """The template's metric filters (``AWS::Logs::MetricFilter``), one metric each."""
    filters = []
    for resource in template_resources().values():
        if resource["Type"] != "AWS::Logs::MetricFilter":
            continue
        properties = resource["Properties"]
        (metric,) = properties["MetricTransformations"]
        filters.append(
            MetricFilter(
                log_group=properties["LogGroupName"],
                pattern=properties["FilterPattern"],
                metric=metric["MetricName"],
                namespace=metric["MetricNamespace"],
                unit=metric["Unit"],
                value=metric["MetricValue"].removeprefix("$."),
                dimensions={d["Key"]: d["Value"].removeprefix("$.") for d in metric.get("Dimensions", [])},
            )
        )
    return filters


def lambda_process(mirror_root: Path, tmp_path: Path) -> dict[str, str]:
    """Environment for a separate handler process."""
    env = {name: value for name, value in os.environ.items() if name not in LAMBDA_ENV}
    return env | {"MODEL_URI": str(mirror_root), "MODEL_CACHE_DIR": str(tmp_path / "cache")}


class LocalServer:
    """lambda/local.py in a process of its own, on a free port; its stdout (logs and metrics) is read as it comes."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(LAMBDA_DIR / "local.py"), "--port", "0", *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self.url = json.loads(self.process.stdout.readline())["listening"]
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.process.stdout), daemon=True)
        self.reader.start()

    def request(self, method: str = "POST", data: bytes | None = None) -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(urllib.request.Request(self.url, data=data, method=method), timeout=60) as ok:
                assert ok.headers["Content-Type"] == "application/json"
                return ok.status, json.load(ok)
        except urllib.error.HTTPError as exc:
            return exc.code, json.load(exc) if exc.headers["Content-Type"] == "application/json" else {}

    def stop(self) -> list[str]:
        self.process.terminate()
        self.process.wait(timeout=10)
        self.reader.join(timeout=10)
        return self.lines


def cache_folder(cache_root: Path, model_uri: str | Path, layout_root: Path, version: int) -> Path:
    """Where the Lambda caches ``version`` of the store at ``model_uri``, as lambda/settings.py documents it:
    ``<MODEL_CACHE_DIR>/<first 12 hex digits of the sha256 of the store's URI>/<version>-<manifest sha256[:12]>``,
    a local path made absolute; the manifest is read from ``layout_root``, a local copy of the store."""
    uri = str(model_uri)
    canonical = uri.rstrip("/") if uri.startswith("s3://") else str(Path(uri).resolve())
    digest = hashlib.sha256((stored_folder(layout_root, version) / MANIFEST).read_bytes()).hexdigest()[:12]
    return cache_root / hashlib.sha256(canonical.encode()).hexdigest()[:12] / f"{version}-{digest}"


@dataclass(frozen=True)
class Invoker:
    """A handler ``Service`` (lambda/handler.py) over a store of its own: ``invoke(event)`` is its answer."""

    service: Any

    @property
    def store(self) -> Any:
        return self.service.store

    def __call__(self, event: object, context: object = None) -> dict:
        return self.service.handle(event, context)


class LambdaPackage(NamedTuple):
    zip: Path
    make_output: str
    folder: Path  # the zip unpacked, as the Lambda runtime sees it


def lambda_python() -> str:
    """The Lambda runtime's Python version: LAMBDA_PYTHON in the Makefile."""
    return re.search(r"^LAMBDA_PYTHON \?= (\S+)$", (PROJECT_ROOT / "Makefile").read_text(), re.M).group(1)


@functools.cache
def lambda_interpreter() -> str:
    """An interpreter of the runtime's Python, which runs the unpacked zip (``make -s lambda-python``: one on PATH,
    or pyenv's); skipped where there is none, but a failure under CI."""
    found = subprocess.run(["make", "-s", "lambda-python"], cwd=PROJECT_ROOT, capture_output=True, text=True)
    python = found.stdout.strip()
    if not python:
        message = f"no Python {lambda_python()} here to run the Lambda zip (set LAMBDA_PY, or install it with pyenv)"
        unavailable(message)
    return python


def invoke_packaged(package: Path, model_root: Path, cache: Path, events: list[object]) -> list[dict]:
    """The packaged handler's answers to ``events``, run by the runtime's Python in a process that sees only
    ``package``: no site-packages (-S), no project, no torch. Its logs and metrics go to stdout before the answers."""
    code = (
        "import json, sys; sys.path[:0] = [sys.argv[1]]; import handler; "
        "answers = [handler.lambda_handler(event, None) for event in json.load(sys.stdin)]; "
        "print(json.dumps(answers))"
    )
    done = subprocess.run(
        [lambda_interpreter(), "-S", "-c", code, str(package)],
        input=json.dumps(events),
        env={"MODEL_URI": str(model_root), "MODEL_CACHE_DIR": str(cache)},
        cwd=cache.parent,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def mirror_version(bundle: Path, root: Path, version: int, champion: bool = True) -> Path:
    """Lay ``bundle`` out as ``root/v<version>-<digest>/`` with its manifest, through the mirror step's own
    ``put_verified`` (the manifest last); then, if asked, point champion.json at it with its ``point_to``. Returns
    the folder."""
    from agnews.promotion.mirror import point_to, put_verified  # MLflow loads only for the tests that mirror

    storage = LocalStorage(root)
    files = {path.name: path.read_bytes() for path in sorted(bundle.iterdir())}
    manifest = manifest_bytes(MODEL_NAME, version, "test", {}, files, datetime.now(UTC).isoformat())
    folder = version_folder(version, sha256(manifest))
    for name, data in (files | {MANIFEST: manifest}).items():
        put_verified(storage, f"{folder}/{name}", data)
    if champion:
        point_to(storage, POINTER, MODEL_NAME, version, manifest)
    return root / folder


def stored_folder(root: Path, version: int) -> Path:
    """The one folder of ``version`` below ``root``: ``v<version>-<digest>``."""
    (folder,) = root.glob(f"v{version}-*")
    return folder


def point_champion(folder: Path) -> Path:
    """Point the champion.json beside ``folder`` at its manifest with the mirror step's ``point_to``, for the version
    that the folder's name gives. A manifest changed since it was laid out first moves its folder to the name its
    digest gives, where the mirror would have written it. Returns the folder."""
    from agnews.promotion.mirror import point_to

    version = int(re.fullmatch(r"v(\d+)-[0-9a-f]+", folder.name).group(1))
    manifest = (folder / MANIFEST).read_bytes()
    named = folder.rename(folder.with_name(version_folder(version, sha256(manifest))))
    point_to(LocalStorage(folder.parent), POINTER, MODEL_NAME, version, manifest)
    return named


@dataclass(frozen=True)
class TrainRuns:
    """Finished train runs on one tracking server, and where they came from."""

    tracking_uri: str
    data_bucket: str  # the dataset the runs trained on (the upload step's storage)
    upload: str
    worse: str
    good: str


@dataclass
class WebhookReceiver:
    """A running `python -m steps.webhook serve` and the webhook that delivers to it."""

    url: str
    secret: str
    webhook_id: str
    process: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text()


def upload_tree(root: Path, endpoint: str, bucket: str, prefix: str) -> None:
    """Copy every file below ``root`` to ``s3://bucket/prefix/``, champion.json last."""
    client = boto3.client("s3", endpoint_url=endpoint)
    files = sorted(root.rglob("*"), key=lambda p: p.name == POINTER)
    for path in files:
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(root).as_posix()}")


# ---- The command sequences of the README and docs/, run as written ----

README = PROJECT_ROOT / "README.md"
# The README and the reference pages: where a `<!-- sequence: NAME -->` line may mark the bash block after it.
DOCUMENTS = (README, *sorted((PROJECT_ROOT / "docs").glob("*.md")))
SEQUENCE = re.compile(r"<!-- sequence: ([\w-]+) -->\n```bash\n(.*?)```", re.DOTALL)


def sequences() -> dict[str, tuple[Path, str]]:
    """Every marked block by its name: the document that holds it, and the block. A name used twice fails."""
    found: dict[str, tuple[Path, str]] = {}
    for document in DOCUMENTS:
        for name, block in SEQUENCE.findall(document.read_text()):
            assert name not in found, f"sequence {name!r} is marked in {found[name][0].name} and in {document.name}"
            found[name] = (document, block)
    return found


def readme_sequence(name: str) -> str:
    """The bash block that follows ``<!-- sequence: name -->`` in the README or a page of docs/."""
    found = sequences().get(name)
    assert found, f"no sequence {name!r} in README.md or docs/"
    return found[1]


def checkout(tmp_path: Path) -> Path:
    """The project's files as a fresh checkout has them, in ``tmp_path/agnews-mlops``, with this work tree's .venv
    and the AG News copy at ``../shared/data/ag_news``, where the README expects them."""
    root = tmp_path / "agnews-mlops"
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        if (PROJECT_ROOT / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(PROJECT_ROOT / name, root / name)
    (root / ".venv").symlink_to(PROJECT_ROOT / ".venv")
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "shared" / "data" / "ag_news").symlink_to(require_agnews())
    return root


# What the README's sequences assume of the shell: no tracking server or bucket, unless the README says to set one.
UNSET_FOR_SEQUENCES = ("MLFLOW_TRACKING_URI", "S3_BUCKET", "S3_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL")


@dataclass
class Sequence:
    """A README sequence that has run: its exit status, and its output so far (commands it left running in the
    background, as ``... &``, still write to it)."""

    returncode: int
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@contextlib.contextmanager
def run_as_written(block: str, cwd: Path, env: dict[str, str] | None = None) -> Iterator[Sequence]:
    """``block`` in bash, stopping at the first failing command, in ``env`` (default: this environment less
    UNSET_FOR_SEQUENCES). Yields once bash has exited; what the block left running is stopped afterwards, and waited
    for (an `mlflow server` takes seconds to stop its workers), so that its ports are free again."""
    if env is None:
        env = {key: value for key, value in os.environ.items() if key not in UNSET_FOR_SEQUENCES}
    log = cwd.parent / "sequence.log"
    with log.open("wb") as out:  # a file, not a pipe: a command left in the background keeps its output open
        bash = subprocess.Popen(
            ["bash", "-euo", "pipefail", "-c", block],
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        bash.wait(timeout=900)
        yield Sequence(bash.returncode, log)
    finally:
        stop_group(bash.pid)


def stop_group(group: int, within_s: float = 60) -> None:
    """SIGTERM to process group ``group``, then SIGKILL to what is left of it after ``within_s``."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal.SIGTERM)
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            os.killpg(group, 0)  # ProcessLookupError once every member has exited
            time.sleep(0.5)
        os.killpg(group, signal.SIGKILL)


# ---- Compose's .env, as `cp .env.example .env` and an editor leave it ----

ENV_EXAMPLE = PROJECT_ROOT / ".env.example"
# What the user writes into .env: every value that .env.example leaves empty, but the optional ones (S3_ENDPOINT_URL,
# SAMPLE_SIZE, APP_UID, APP_GID, BIND_ADDRESS, MLFLOW_ALLOWED_HOSTS).
FILLED = {
    "AWS_ACCESS_KEY_ID": "agnews-pipeline",
    "AWS_SECRET_ACCESS_KEY": "pipeline-secret-0001",
    "MINIO_ROOT_USER": "minio-root",
    "MINIO_ROOT_PASSWORD": "minio-root-secret-0001",
    "MLFLOW_AUTH_ADMIN_USERNAME": "admin",
    "MLFLOW_AUTH_ADMIN_PASSWORD": "admin-secret-0001",
    "MLFLOW_FLASK_SERVER_SECRET_KEY": "0123456789abcdef0123456789abcdef",
    "MLFLOW_TRACKING_USERNAME": "admin",
    "MLFLOW_TRACKING_PASSWORD": "admin-secret-0001",
    "AGNEWS_WEBHOOK_SECRET": "webhook-secret-0001",
    "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": "ZmDfcTF7_60GrrY167zsiPd67pEvs0aGOv2oasOM1Pg=",
    "POSTGRES_PASSWORD": "postgres-secret-0001",
}


def read_env(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines() if line and not line.startswith("#"))
    return {name: value for name, value in pairs}


def write_env(path: Path, values: dict[str, str]) -> Path:
    path.write_text("".join(f"{name}={value}\n" for name, value in values.items()))
    return path


def read_scored(output: Path) -> Any:
    """The predict step's parquet dataset at ``output`` as a DataFrame, in the order of its ``id`` column."""
    import pyarrow.dataset as ds

    return ds.dataset(output).to_table().to_pandas().sort_values("id").reset_index(drop=True)
