"""Fixtures for the Lambda tests: a real tiny serving bundle, the mirror layout, and the handler module.

Loaded by tests/conftest.py (``pytest_plugins``). The layout is the mirror step's (its pointer is written by
``steps.mirror.point_to``), laid out here straight from a bundle folder, with no registry; the parity test runs
the mirror step itself.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

import boto3
import pytest

from steps.config import PROJECT_ROOT, compose
from steps.mirror import MANIFEST, POINTER, digest, point_to
from steps.storage import LocalStorage

LAMBDA_DIR = PROJECT_ROOT / "lambda"
MODEL_NAME = "distilbert-agnews"
SEED_TEXT = "Apple reported strong quarterly earnings with iPhone sales up 15%"
LABELS = ["World", "Sports", "Business", "Sci/Tech"]
LAMBDA_ENV = (
    "MODEL_URI",
    "S3_BUCKET",
    "MODEL_PREFIX",
    "MODEL_REFRESH_SECONDS",
    "MAX_TEXT_CHARS",
    "MAX_BATCH",
    "MODEL_CACHE_DIR",
    "AWS_LAMBDA_FUNCTION_NAME",
)


class LambdaPackage(NamedTuple):
    zip: Path
    make_output: str
    folder: Path  # the zip unpacked, as the Lambda runtime sees it


def lambda_python() -> str:
    """The Lambda runtime's Python version: LAMBDA_PYTHON in the Makefile."""
    return re.search(r"^LAMBDA_PYTHON \?= (\S+)$", (PROJECT_ROOT / "Makefile").read_text(), re.M).group(1)


def invoke_packaged(package: Path, model_root: Path, cache: Path, events: list[object]) -> list[dict]:
    """The packaged handler's answers to ``events``, in a process that sees only ``package``: no site-packages (-S),
    no project, no torch."""
    code = (
        "import json, sys; sys.path[:0] = [sys.argv[1]]; import handler; "
        "print(json.dumps([handler.lambda_handler(event, None) for event in json.load(sys.stdin)]))"
    )
    done = subprocess.run(
        [sys.executable, "-S", "-c", code, str(package)],
        input=json.dumps(events),
        env={"MODEL_URI": str(model_root), "MODEL_CACHE_DIR": str(cache)},
        cwd=cache.parent,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


@pytest.fixture(scope="session")
def lambda_package(tmp_path_factory: pytest.TempPathFactory) -> LambdaPackage:
    """``make lambda-zip`` into a temporary folder, and the zip unpacked; it runs on the runtime's Python only."""
    python = lambda_python()
    if f"{sys.version_info.major}.{sys.version_info.minor}" != python:
        pytest.skip(f"the Lambda zip holds wheels for Python {python}, and this is Python {sys.version.split()[0]}")
    tmp = tmp_path_factory.mktemp("lambda-zip")
    out = tmp / "lambda.zip"
    done = subprocess.run(
        [
            "make",
            "-o",
            ".venv/.installed",
            "lambda-zip",
            f"PY={sys.executable}",
            f"LAMBDA_BUILD={tmp / 'build'}",
            f"LAMBDA_ZIP={out}",
        ],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    with zipfile.ZipFile(out) as archive:
        archive.extractall(tmp / "unpacked")
    return LambdaPackage(out, done.stdout, tmp / "unpacked")


def mirror_version(bundle: Path, root: Path, version: int, champion: bool = True) -> Path:
    """Lay ``bundle`` out as ``root/v<version>/`` with its manifest; then, if asked, point champion.json at it."""
    folder = root / f"v{version}"
    folder.mkdir(parents=True)
    files = {}
    for path in sorted(bundle.iterdir()):
        shutil.copy(path, folder / path.name)
        files[path.name] = digest(path.read_bytes())
    manifest = {
        "model_name": MODEL_NAME,
        "version": version,
        "run_id": "test",
        "metrics": {},
        "files": files,
        "created_at": datetime.now(UTC).isoformat(),
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
    if champion:
        point_champion(root, version)
    return folder


def point_champion(root: Path, version: int) -> None:
    """Write ``champion.json`` naming ``v<version>``, as the mirror step does."""
    manifest_bytes = (root / f"v{version}" / MANIFEST).read_bytes()
    point_to(LocalStorage(root), POINTER, MODEL_NAME, version, manifest_bytes)


def upload_tree(root: Path, endpoint: str, bucket: str, prefix: str) -> None:
    """Copy every file below ``root`` to ``s3://bucket/prefix/``, champion.json last."""
    client = boto3.client("s3", endpoint_url=endpoint)
    files = sorted(root.rglob("*"), key=lambda p: p.name == POINTER)
    for path in files:
        if path.is_file():
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(root).as_posix()}")


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real serving bundle of the randomly initialised tiny DistilBERT (conf/model/tiny.yaml)."""
    import torch

    from steps.modeling import load_model, load_tokenizer
    from steps.serving import export_bundle

    cfg = compose(["model=tiny"])
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model, list(cfg.data.labels), tokenizer)
    out = tmp_path_factory.mktemp("bundle")
    t = cfg.train
    return export_bundle(model, tokenizer, list(cfg.data.labels), t.max_length, t.serving_batch_size, out, t.onnx_opset)


@pytest.fixture
def mirror_root(tmp_path: Path, tiny_bundle: Path) -> Path:
    """A local model root (``models/distilbert-agnews``) whose champion is v1."""
    root = tmp_path / "store" / "models" / MODEL_NAME
    mirror_version(tiny_bundle, root, 1)
    return root


@pytest.fixture
def lambda_module(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """The handler module with no Lambda variables set and a fresh model store."""
    for name in LAMBDA_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.syspath_prepend(str(LAMBDA_DIR))
    import handler

    handler.model_store.cache_clear()
    yield handler
    handler.model_store.cache_clear()


@pytest.fixture
def serve(
    lambda_module: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> Callable[..., Callable[[object], dict]]:
    """``serve(model_uri, NAME=value, ...)`` configures the handler and returns ``invoke(event)``."""

    def configure(model_uri: str | Path, **env: str) -> Callable[[object], dict]:
        settings = {"MODEL_URI": str(model_uri), "MODEL_CACHE_DIR": str(tmp_path / "cache")} | env
        for name, value in settings.items():
            monkeypatch.setenv(name, value)
        lambda_module.model_store.cache_clear()
        return lambda event: lambda_module.lambda_handler(event, None)

    return configure
