"""Fixtures for the Lambda tests: a real tiny serving bundle, the mirror layout, and the handler module.

The layout is the mirror step's (``tests.helpers.mirror_version`` writes ``v<N>-<digest>/`` and ``champion.json``
with the mirror's own ``put_verified`` and ``point_to``), laid out straight from a bundle folder, with no registry;
the parity test runs the mirror step itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

from agnews.config import PROJECT_ROOT, compose
from tests.helpers import (
    LAMBDA_DIR,
    LAMBDA_ENV,
    MODEL_NAME,
    Invoker,
    LambdaPackage,
    lambda_interpreter,
    mirror_version,
)


@pytest.fixture(scope="session")
def lambda_package(tmp_path_factory: pytest.TempPathFactory) -> LambdaPackage:
    """``make lambda-zip`` into a temporary folder, and the zip unpacked; it runs on the runtime's Python only
    (``lambda_interpreter``), which also compiles its bytecode."""
    python = lambda_interpreter()
    tmp = tmp_path_factory.mktemp("lambda-zip")
    out = tmp / "lambda.zip"
    done = subprocess.run(
        [
            "make",
            "-o",
            ".venv/.installed",
            "lambda-zip",
            f"PY={sys.executable}",
            f"LAMBDA_PY={python}",
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


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real serving bundle of the randomly initialised tiny DistilBERT (conf/model/tiny.yaml)."""
    import torch

    from agnews.export import export_bundle
    from agnews.modeling import load_model, load_tokenizer

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
def lambda_module(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The handler module (lambda/ on the path), with no Lambda variables set. The tests serve through Services over
    stores of their own (``serve``), never through the container's store, which a process builds only once."""
    for name in LAMBDA_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.syspath_prepend(str(LAMBDA_DIR))
    import handler

    return handler


@pytest.fixture
def serve(lambda_module: ModuleType, tmp_path: Path) -> Callable[..., Invoker]:
    """``serve(model_uri, NAME=value, ...)``: a Service over a ModelStore of its own (a new container) configured by
    those variables and the environment, its cache in tmp_path; call it with an event."""
    import model_store  # lambda/'s, imported with the handler

    def configure(model_uri: str | Path, **env: str) -> Invoker:
        settings = {"MODEL_URI": str(model_uri), "MODEL_CACHE_DIR": str(tmp_path / "cache")} | env
        store = model_store.ModelStore(lambda_module.Settings.from_env(os.environ | settings))
        return Invoker(lambda_module.Service(store))

    return configure
