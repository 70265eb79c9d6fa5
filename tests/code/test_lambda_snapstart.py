"""SnapStart: the handler registers its runtime hooks with snapshot-restore-py, and they do what a snapshot needs.

The hooks are called from the library's own registry, as the Lambda runtime calls them: before the snapshot, the
champion is loaded; after a restore, ``random`` is re-seeded and ``champion.json`` is read again at once."""

from __future__ import annotations

import random
from pathlib import Path
from types import ModuleType

import pytest
from snapshot_restore_py import get_after_restore, get_before_snapshot

from tests.helpers import SEED_TEXT, Invoker, cache_folder, mirror_version


def run_hooks(registry: list) -> None:
    for hook, args, kwargs in registry:
        hook(*args, **kwargs)


def registered(registry: list) -> set[str]:
    return {f"{hook.__module__}.{hook.__qualname__}" for hook, _, _ in registry}


def container(lambda_module: ModuleType, monkeypatch: pytest.MonkeyPatch, serve, root: Path) -> Invoker:
    """A container serving ``root``: the store that the hooks reach through ``model_store()`` is the one that answers,
    with a refresh interval that does not end during the test."""
    invoke = serve(root, MODEL_REFRESH_SECONDS="3600")
    monkeypatch.setattr(lambda_module, "model_store", lambda: invoke.store)
    return invoke


def test_the_handler_registers_its_hooks(lambda_module: ModuleType) -> None:
    assert "handler.load_before_snapshot" in registered(get_before_snapshot())
    assert "handler.recheck_after_restore" in registered(get_after_restore())


def test_before_the_snapshot_the_champion_is_loaded(
    lambda_module: ModuleType, monkeypatch: pytest.MonkeyPatch, serve, tiny_bundle: Path, tmp_path: Path
) -> None:
    root = tmp_path / "store"
    folder = mirror_version(tiny_bundle, root, 1)
    invoke = container(lambda_module, monkeypatch, serve, root)
    cached = cache_folder(tmp_path / "cache", root, root, 1)
    assert not cached.exists()
    run_hooks(get_before_snapshot())
    assert sorted(path.name for path in cached.iterdir()) == ["config.json", "model.int8.onnx", "tokenizer.json"]
    for name in ("champion.json", folder.name):  # the store gone: the answer comes from what the snapshot holds
        target = root / name
        target.rename(tmp_path / f"gone-{name}")
    assert invoke({"text": SEED_TEXT})["body"]["model_version"] == 1


def test_after_a_restore_the_champion_is_read_again_at_once_and_random_is_reseeded(
    lambda_module: ModuleType, monkeypatch: pytest.MonkeyPatch, serve, tiny_bundle: Path, tmp_path: Path
) -> None:
    root = tmp_path / "store"
    mirror_version(tiny_bundle, root, 1)
    invoke = container(lambda_module, monkeypatch, serve, root)
    run_hooks(get_before_snapshot())
    mirror_version(tiny_bundle, root, 2)  # promoted while the snapshot waited
    assert invoke({"text": SEED_TEXT})["body"]["model_version"] == 1  # the refresh interval has not ended

    random.seed(0)
    drawn = random.random()
    random.seed(0)
    run_hooks(get_after_restore())
    assert random.random() != drawn
    assert invoke({"text": SEED_TEXT})["body"]["model_version"] == 2
