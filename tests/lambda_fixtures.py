"""Fixtures for the Lambda tests: a real tiny serving bundle, the mirror layout, and the handler module.

Loaded by tests/conftest.py (``pytest_plugins``). The mirror layout is written here, by the contract in
steps/serving.py and issue 4, until the mirror step exists.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType

import boto3
import pytest

from steps.config import PROJECT_ROOT, compose

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


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def mirror_version(bundle: Path, root: Path, version: int, champion: bool = True) -> Path:
    """Lay ``bundle`` out as ``root/v<version>/`` with its manifest; then, if asked, point champion.json at it."""
    folder = root / f"v{version}"
    folder.mkdir(parents=True)
    files = {}
    for path in sorted(bundle.iterdir()):
        shutil.copy(path, folder / path.name)
        files[path.name] = {"sha256": _sha256(path), "bytes": path.stat().st_size}
    manifest = {
        "model_name": MODEL_NAME,
        "version": version,
        "run_id": "test",
        "metrics": {},
        "files": files,
        "created_at": datetime.now(UTC).isoformat(),
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))
    if champion:
        point_champion(root, version)
    return folder


def point_champion(root: Path, version: int) -> None:
    """Write ``champion.json`` naming ``v<version>``, with its manifest's sha256."""
    pointer = {
        "model_name": MODEL_NAME,
        "version": version,
        "manifest": f"v{version}/manifest.json",
        "manifest_sha256": _sha256(root / f"v{version}" / "manifest.json"),
        "updated_at": datetime.now(UTC).isoformat(),
    }
    (root / "champion.json").write_text(json.dumps(pointer, indent=2))


def upload_tree(root: Path, endpoint: str, bucket: str, prefix: str) -> None:
    """Copy every file below ``root`` to ``s3://bucket/prefix/``, champion.json last."""
    client = boto3.client("s3", endpoint_url=endpoint)
    files = sorted(root.rglob("*"), key=lambda p: p.name == "champion.json")
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
    return export_bundle(model, tokenizer, list(cfg.data.labels), cfg.train.max_length, out, cfg.train.onnx_opset)


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
