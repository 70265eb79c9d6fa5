"""Model loading for the Lambda: the mirror layout from a folder and from S3 (moto over HTTP), sha256 checks,
the download cache, keeping a good model when a new one is bad, and hot swaps."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import boto3
import pytest

from tests.helpers import MODEL_NAME, SEED_TEXT, mirror_version, point_champion, upload_tree

PREFIX = f"models/{MODEL_NAME}"


def served_version(invoke) -> object:
    response = invoke({"text": SEED_TEXT})
    assert response["statusCode"] == 200, response
    return response["body"]["model_version"]


def check_served_from_s3(invoke, cache: Path) -> None:
    response = invoke({"text": SEED_TEXT})
    assert response["statusCode"] == 200
    assert response["body"]["model_version"] == 1
    assert sorted(p.name for p in (cache / "1").iterdir()) == ["config.json", "model.int8.onnx", "tokenizer.json"]


def test_serves_from_s3_bucket_and_prefix(serve, mirror_root: Path, s3_env: str, bucket: str, tmp_path: Path) -> None:
    upload_tree(mirror_root, s3_env, bucket, PREFIX)
    check_served_from_s3(serve("", S3_BUCKET=bucket, MODEL_PREFIX=PREFIX), tmp_path / "cache")


def test_serves_from_s3_model_uri(serve, mirror_root: Path, s3_env: str, bucket: str, tmp_path: Path) -> None:
    upload_tree(mirror_root, s3_env, bucket, PREFIX)
    check_served_from_s3(serve(f"s3://{bucket}/{PREFIX}"), tmp_path / "cache")


def test_s3_without_the_model_gives_503_naming_the_key(serve, s3_env: str, bucket: str) -> None:
    response = serve(f"s3://{bucket}/{PREFIX}")({"text": SEED_TEXT})
    assert response["statusCode"] == 503
    assert response["body"]["error"] == (
        f"no model available: cannot read s3://{bucket}/{PREFIX}/champion.json: NoSuchKey "
        "(missing, or not readable by this role)"
    )


def test_verified_files_in_the_cache_are_kept_and_bad_ones_replaced(serve, mirror_root: Path, tmp_path: Path) -> None:
    cached = tmp_path / "cache" / "1"
    served_version(serve(mirror_root))
    kept = {p.name: p.stat().st_ino for p in cached.iterdir()}
    (cached / "tokenizer.json").write_text("{}")
    served_version(serve(mirror_root))  # a new container: a fresh store over the same /tmp
    now = {p.name: p.stat().st_ino for p in cached.iterdir()}
    assert now["model.int8.onnx"] == kept["model.int8.onnx"]
    assert now["tokenizer.json"] != kept["tokenizer.json"]
    assert (cached / "tokenizer.json").read_bytes() == (mirror_root / "v1" / "tokenizer.json").read_bytes()


def test_promotion_is_picked_up_and_the_old_version_cleaned(serve, mirror_root: Path, tiny_bundle, tmp_path) -> None:
    invoke = serve(mirror_root, MODEL_REFRESH_SECONDS="0")
    assert served_version(invoke) == 1
    mirror_version(tiny_bundle, mirror_root, 2)
    assert served_version(invoke) == 2
    assert not (tmp_path / "cache" / "1").exists()
    point_champion(mirror_root, 1)  # a rollback is a promotion too
    assert served_version(invoke) == 1


def test_refresh_waits_for_the_interval(serve, mirror_root: Path, tiny_bundle: Path) -> None:
    invoke = serve(mirror_root, MODEL_REFRESH_SECONDS="3600")
    assert served_version(invoke) == 1
    mirror_version(tiny_bundle, mirror_root, 2)
    assert served_version(invoke) == 1


def corrupt(folder: Path) -> None:
    with (folder / "model.int8.onnx").open("r+b") as stream:
        stream.seek(1000)
        stream.write(b"\x00" * 16)


def remove_tokenizer(folder: Path) -> None:
    (folder / "tokenizer.json").unlink()


def tamper_manifest(folder: Path) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["config.json"]["sha256"] = "0" * 64
    (folder / "manifest.json").write_text(json.dumps(manifest))


def drop_from_manifest(folder: Path) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["files"]["model.int8.onnx"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    point_champion(folder.parent, int(folder.name[1:]))


def escape_folder(folder: Path) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["../../escape"] = manifest["files"]["config.json"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    point_champion(folder.parent, int(folder.name[1:]))


def mislabel_version(folder: Path) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["version"] = 99
    (folder / "manifest.json").write_text(json.dumps(manifest))
    point_champion(folder.parent, int(folder.name[1:]))


BAD_VERSIONS = [
    (corrupt, "model.int8.onnx: sha256"),
    (remove_tokenizer, "cannot read"),
    (tamper_manifest, "manifest.json: sha256"),
    (drop_from_manifest, "lists no model.int8.onnx"),
    (escape_folder, "file '../../escape' is not a plain file name"),
    (mislabel_version, "manifest.json is for version 99, not"),
]


@pytest.mark.parametrize(("spoil", "problem"), BAD_VERSIONS, ids=[f.__name__ for f, _ in BAD_VERSIONS])
def test_a_bad_new_version_leaves_the_good_one_serving(
    serve, mirror_root: Path, tiny_bundle: Path, caplog: pytest.LogCaptureFixture, spoil, problem: str
) -> None:
    invoke = serve(mirror_root, MODEL_REFRESH_SECONDS="0")
    assert served_version(invoke) == 1
    spoil(mirror_version(tiny_bundle, mirror_root, 2))
    with caplog.at_level(logging.ERROR, logger="agnews"):
        assert served_version(invoke) == 1
    assert any("keeping version 1" in r.message and problem in r.message for r in caplog.records), caplog.text


@pytest.mark.parametrize(("spoil", "problem"), BAD_VERSIONS, ids=[f.__name__ for f, _ in BAD_VERSIONS])
def test_a_bad_only_version_gives_503_with_the_reason(serve, tmp_path: Path, tiny_bundle: Path, spoil, problem):
    root = tmp_path / "root"
    spoil(mirror_version(tiny_bundle, root, 1))
    response = serve(root)({"text": SEED_TEXT})
    assert response["statusCode"] == 503
    assert problem in response["body"]["error"]
    assert not (tmp_path / "escape").exists()


def test_a_corrupt_champion_pointer_gives_503(serve, mirror_root: Path) -> None:
    (mirror_root / "champion.json").write_text("{not json")
    error = serve(mirror_root)({"text": SEED_TEXT})["body"]["error"]
    assert error.startswith(f"no model available: {mirror_root / 'champion.json'} is not valid JSON")


BAD_POINTERS = [
    ({"version": None}, ": 'version' is NoneType, not int"),
    ({"version": True}, ": 'version' must not be a boolean"),
    ({"version": "1"}, ": 'version' is str, not int"),
    ({"manifest": "../v1/manifest.json"}, ": manifest path part '..' is not a plain file name"),
    ({"manifest_sha256": "not-a-digest"}, ": 'manifest_sha256' is not a sha256 hex digest"),
]


@pytest.mark.parametrize(("change", "problem"), BAD_POINTERS, ids=[problem for _, problem in BAD_POINTERS])
def test_a_pointer_that_breaks_the_contract_gives_503_naming_it(serve, mirror_root: Path, change, problem) -> None:
    pointer = mirror_root / "champion.json"
    pointer.write_text(json.dumps(json.loads(pointer.read_text()) | change))
    error = serve(mirror_root)({"text": SEED_TEXT})["body"]["error"]
    assert error == f"no model available: {pointer}{problem}"


def test_a_pointer_that_breaks_the_contract_leaves_the_good_model_serving(
    serve, mirror_root: Path, s3_env: str, bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    upload_tree(mirror_root, s3_env, bucket, PREFIX)
    invoke = serve(f"s3://{bucket}/{PREFIX}", MODEL_REFRESH_SECONDS="0")
    assert served_version(invoke) == 1
    pointer = json.loads((mirror_root / "champion.json").read_text()) | {"version": None}
    s3 = boto3.client("s3", endpoint_url=s3_env)
    s3.put_object(Bucket=bucket, Key=f"{PREFIX}/champion.json", Body=json.dumps(pointer).encode())
    with caplog.at_level(logging.ERROR, logger="agnews"):
        assert served_version(invoke) == 1
    problem = f"keeping version 1: s3://{bucket}/{PREFIX}/champion.json: 'version' is NoneType, not int"
    assert problem in caplog.messages


def test_swap_under_load_fails_no_request(serve, lambda_module, mirror_root: Path, tiny_bundle: Path) -> None:
    invoke = serve(mirror_root, MODEL_REFRESH_SECONDS="0")
    held = lambda_module.model_store().get()  # a request in flight on v1
    statuses: list[int] = []

    def client() -> None:
        statuses.extend(invoke({"texts": [SEED_TEXT] * 4})["statusCode"] for _ in range(5))

    threads = [threading.Thread(target=client) for _ in range(4)]
    for thread in threads:
        thread.start()
    for version in (2, 3):
        mirror_version(tiny_bundle, mirror_root, version)
    for thread in threads:
        thread.join()
    assert statuses == [200] * 20
    assert served_version(invoke) == 3
    assert not held.folder.exists()
    assert held.predictor.predict([SEED_TEXT])[0]["predicted_class"]  # the old model still answers


def test_s3_promotion_reaches_a_warm_container(serve, mirror_root: Path, tiny_bundle, s3_env: str, bucket: str):
    upload_tree(mirror_root, s3_env, bucket, PREFIX)
    invoke = serve(f"s3://{bucket}/{PREFIX}", MODEL_REFRESH_SECONDS="0")
    assert served_version(invoke) == 1
    staging = mirror_root.parent / "v2-staging"
    mirror_version(tiny_bundle, staging, 2)
    upload_tree(staging, s3_env, bucket, PREFIX)
    assert served_version(invoke) == 2
    boto3.client("s3", endpoint_url=s3_env).delete_object(Bucket=bucket, Key=f"{PREFIX}/champion.json")
    assert served_version(invoke) == 2  # a pointer gone missing leaves the model in place
