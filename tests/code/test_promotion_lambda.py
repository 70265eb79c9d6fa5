"""Immutable mirrored versions, seen from the Lambda: a second registry mirroring its own v1 into the same bucket
(killed half-way, then completed) cannot change the bytes that a running or a cold Lambda serves, and the Lambda
swaps when the manifest's digest changes under the same version number."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import boto3
import pytest
from mlflow import MlflowClient

from agnews.config import PROJECT_ROOT, compose
from agnews.errors import StorageError
from agnews.names import CHAMPION
from agnews.promotion.mirror import mirror
from agnews.promotion.register import register
from agnews.promotion.registry import aliases
from agnews.settings import Settings
from agnews.storage import S3Storage
from agnews.tracking import connect, step_run
from bundle.layout import MANIFEST, POINTER, sha256
from bundle.predictor import Predictor
from tests.helpers import LAMBDA_DIR, SEED_TEXT, TrainRuns, mirror_version

GATE_OPEN = ["registry.min_accuracy=0", "registry.min_behaviour_pass_rate=0"]


def objects(bucket: str, prefix: str) -> dict[str, bytes]:
    s3 = boto3.client("s3", endpoint_url=os.environ["S3_ENDPOINT_URL"])
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]
    return {key: s3.get_object(Bucket=bucket, Key=key)["Body"].read() for key in keys}


def answer(invoke: Callable[[object], dict]) -> dict:
    response = invoke({"text": SEED_TEXT})
    assert response["statusCode"] == 200, response
    return response["body"]


def folder_answer(files: dict[str, bytes], folder: str, tmp: Path) -> dict[str, float]:
    """The probabilities that the bundle in ``folder`` (keys of ``files``) gives SEED_TEXT, loaded on its own."""
    local = tmp / folder.rsplit("/", 1)[-1]
    local.mkdir(parents=True)
    for key, data in files.items():
        if key.startswith(f"{folder}/"):
            (local / key.rsplit("/", 1)[-1]).write_bytes(data)
    return Predictor(local).predict([SEED_TEXT])[0]["probabilities"]


def cold_answer(model_uri: str, cache: Path) -> dict:
    """The answer of a cold Lambda: the handler in a new process with an empty download cache."""
    code = (
        "import json, sys; sys.path[:0] = sys.argv[1:3]; import handler; "
        "print(json.dumps(handler.lambda_handler({'text': sys.argv[3]}, None)))"
    )
    env = os.environ | {"MODEL_URI": model_uri, "MODEL_CACHE_DIR": str(cache)}
    done = subprocess.run(
        [sys.executable, "-c", code, str(LAMBDA_DIR), str(PROJECT_ROOT), SEED_TEXT],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    response = json.loads(done.stdout.strip().splitlines()[-1])
    assert response["statusCode"] == 200, response
    return response["body"]


def run_register(cfg: Settings):
    with step_run(cfg, "register"):
        return register(cfg.registry, cfg.storage, cfg.tracking.experiment, cfg.registry.run_id)


def test_a_second_registry_cannot_change_what_the_lambda_serves(
    train_runs: TrainRuns,
    run_copier: Callable[..., str],
    serve,
    s3_env: str,
    bucket: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    name = "shared-bucket-model"
    root = f"models/{name}"
    settings = ["tracking.experiment=registry-tests", f"storage.uri=s3://{bucket}", f"registry.model_name={name}"]
    first = compose(
        [f"tracking.uri={train_runs.tracking_uri}", *settings, f"registry.run_id={train_runs.good}", *GATE_OPEN]
    )
    assert run_register(first).version == 1
    first_files = objects(bucket, root)
    first_folder = f"{root}/{json.loads(first_files[f'{root}/{POINTER}'])['manifest'].split('/')[0]}"
    expected_first = folder_answer(first_files, first_folder, tmp_path / "expected")

    model_uri = f"s3://{bucket}/{root}"
    warm = serve(model_uri, MODEL_REFRESH_SECONDS="0")  # a running Lambda, in this process
    served = answer(warm)
    assert served["model_version"] == 1 and served["probabilities"] == pytest.approx(expected_first)

    # A second registry: its own SQLite store with its own v1 (a copy of the worse run), the same model name and
    # bucket, as after `make clean` with S3_BUCKET set.
    second_tracking = f"tracking.uri=sqlite:///{tmp_path / 'second' / 'mlflow.db'}"
    connect(compose([second_tracking, *settings]).tracking)  # the experiment, with its artifacts beside the database
    copied = run_copier(train_runs.tracking_uri, train_runs.worse, second_tracking.split("=", 1)[1])
    second = compose([second_tracking, *settings, f"registry.run_id={copied}", *GATE_OPEN])

    # Killed half-way: the bundle files are written, the manifest is not (and so neither is the pointer).
    write = S3Storage.write_bytes

    def killed_at_the_manifest(self: S3Storage, key: str, data: bytes) -> None:
        if key.endswith(f"/{MANIFEST}"):
            raise StorageError(f"cannot write {self.url(key)}: the process was killed")
        write(self, key, data)

    monkeypatch.setattr(S3Storage, "write_bytes", killed_at_the_manifest)
    with pytest.raises(StorageError, match="the process was killed"):
        run_register(second)
    monkeypatch.setattr(S3Storage, "write_bytes", write)
    half = objects(bucket, root)
    assert {k: v for k, v in half.items() if k in first_files} == first_files, "nothing of the first v1 changed"
    assert len(half) > len(first_files), "the second registry did write its own files"
    assert answer(warm)["probabilities"] == pytest.approx(expected_first)
    assert cold_answer(model_uri, tmp_path / "cold-1")["probabilities"] == pytest.approx(expected_first)

    # Completed: the pointer names the second registry's v1, in its own folder; both Lambdas serve it.
    connect(second.tracking)
    assert mirror(second.registry, second.storage).version == 1
    done = objects(bucket, root)
    assert {k: v for k, v in done.items() if k in first_files and not k.endswith(POINTER)} == {
        k: v for k, v in first_files.items() if not k.endswith(POINTER)
    }, "the first v1's folder is intact"
    second_folder = f"{root}/{json.loads(done[f'{root}/{POINTER}'])['manifest'].split('/')[0]}"
    assert second_folder != first_folder and second_folder.split("/")[-1].startswith("v1-")
    expected_second = folder_answer(done, second_folder, tmp_path / "expected")
    assert expected_second != pytest.approx(expected_first), "two different models"
    swapped = answer(warm)
    assert swapped["model_version"] == 1 and swapped["probabilities"] == pytest.approx(expected_second)
    assert cold_answer(model_uri, tmp_path / "cold-2")["probabilities"] == pytest.approx(expected_second)
    assert aliases(MlflowClient(str(second.tracking.uri)), name) == {CHAMPION: 1}


def test_the_lambda_swaps_when_the_digest_changes_and_not_otherwise(
    serve, mirror_root: Path, tiny_bundle: Path, tmp_path: Path
) -> None:
    """Version 1 mirrored again with other bytes (here another serving batch size in config.json) into its own
    content-addressed folder: the running Lambda loads it though the version number is the same; the same pointer
    written again (a re-run of the mirror) loads nothing."""
    invoke = serve(mirror_root, MODEL_REFRESH_SECONDS="0")
    assert answer(invoke)["model_version"] == 1
    loaded = invoke.store.get()
    assert json.loads((loaded.folder / "config.json").read_text())["batch_size"] != 3

    other = tmp_path / "other-bundle"
    other.mkdir()
    for path in tiny_bundle.iterdir():
        (other / path.name).write_bytes(path.read_bytes())
    config = json.loads((other / "config.json").read_text()) | {"batch_size": 3}
    (other / "config.json").write_text(json.dumps(config))
    folder = mirror_version(other, mirror_root, 1)
    assert len(list(mirror_root.glob("v1-*"))) == 2, "another manifest, another folder"
    pointer = (mirror_root / POINTER).read_bytes()
    assert json.loads(pointer)["manifest"] == f"{folder.name}/{MANIFEST}"

    assert answer(invoke)["model_version"] == 1
    swapped = invoke.store.get()
    assert swapped is not loaded
    assert json.loads((swapped.folder / "config.json").read_text())["batch_size"] == 3
    (mirror_root / POINTER).write_bytes(pointer)  # the same pointer again
    assert answer(invoke)["model_version"] == 1
    assert invoke.store.get() is swapped, "the same manifest is not loaded again"


def test_a_version_folder_is_named_by_its_manifest_digest() -> None:
    from bundle.layout import ContractError, manifest_key, version_folder

    digest = sha256(b"manifest")
    assert version_folder(7, digest) == f"v7-{digest[:12]}"
    assert manifest_key(7, digest) == f"v7-{digest[:12]}/{MANIFEST}"
    with pytest.raises(ContractError, match="is not a sha256 hex digest"):
        version_folder(7, "../../etc")


def test_a_mirrored_file_is_never_replaced_by_other_bytes(mirror_root: Path, tmp_path: Path) -> None:
    from agnews.promotion.mirror import put_verified
    from agnews.storage import LocalStorage

    storage = LocalStorage(tmp_path / "store")
    key = "models/m/v1-0123456789ab/model.int8.onnx"
    assert put_verified(storage, key, b"model bytes")
    assert not put_verified(storage, key, b"model bytes"), "the same bytes: nothing to write"
    with pytest.raises(StorageError, match=r"refusing to replace .* a mirrored file is never replaced"):
        put_verified(storage, key, b"other bytes")
    assert storage.read_bytes(key) == b"model bytes"
