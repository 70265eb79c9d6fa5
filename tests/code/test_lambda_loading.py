"""Model loading for the Lambda: the mirror layout from a folder and from S3 (moto over HTTP), sha256 checks,
the download cache, keeping a good model when a new one is bad, backing off when there is none, and hot swaps.

A 503 tells the caller a short reason; the log says which file, where and why."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import boto3
import pytest

from tests.helpers import (
    MODEL_NAME,
    SEED_TEXT,
    cache_folder,
    mirror_version,
    point_champion,
    stored_folder,
    upload_tree,
)

PREFIX = f"models/{MODEL_NAME}"
UNREADABLE = "no model available: the model store could not be read"
UNVERIFIED = "no model available: the champion model failed verification"
UNLOADABLE = "no model available: the champion model could not be loaded"


def served_version(invoke) -> object:
    response = invoke({"text": SEED_TEXT})
    assert response["statusCode"] == 200, response
    return response["body"]["model_version"]


def check_served_from_s3(invoke, cached: Path) -> None:
    response = invoke({"text": SEED_TEXT})
    assert response["statusCode"] == 200
    assert response["body"]["model_version"] == 1
    assert sorted(p.name for p in cached.iterdir()) == ["config.json", "model.int8.onnx", "tokenizer.json"]


def test_a_load_is_logged_with_the_seconds_of_each_phase(
    serve, mirror_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="agnews"):
        assert served_version(serve(mirror_root)) == 1
    (load,) = [record for record in caplog.records if record.getMessage().startswith("serving version 1 from")]
    assert list(load.load_s) == ["manifest", "fetch", "session", "first_run"]
    assert all(seconds > 0 for seconds in load.load_s.values())


def test_serves_from_s3_bucket_and_prefix(serve, mirror_root: Path, s3_env: str, bucket: str, tmp_path: Path) -> None:
    upload_tree(mirror_root, s3_env, bucket, PREFIX)
    cached = cache_folder(tmp_path / "cache", f"s3://{bucket}/{PREFIX}", mirror_root, 1)
    check_served_from_s3(serve("", S3_BUCKET=bucket, MODEL_PREFIX=PREFIX), cached)


def test_serves_from_s3_model_uri(serve, mirror_root: Path, s3_env: str, bucket: str, tmp_path: Path) -> None:
    upload_tree(mirror_root, s3_env, bucket, PREFIX)
    cached = cache_folder(tmp_path / "cache", f"s3://{bucket}/{PREFIX}", mirror_root, 1)
    check_served_from_s3(serve(f"s3://{bucket}/{PREFIX}/"), cached)  # a trailing slash names the same store


def test_s3_without_the_model_gives_503_and_logs_the_key(
    serve, s3_env: str, bucket: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="agnews"):
        response = serve(f"s3://{bucket}/{PREFIX}")({"text": SEED_TEXT})
    assert (response["statusCode"], response["body"]["error"]) == (503, UNREADABLE)
    assert bucket not in json.dumps(response)
    details = f"cannot read s3://{bucket}/{PREFIX}/champion.json: NoSuchKey (missing, or not readable by this role)"
    assert f"no model to serve: {details}" in caplog.messages


def test_each_store_has_a_cache_folder_of_its_own(serve, mirror_root: Path, tiny_bundle: Path, tmp_path) -> None:
    """Two stores (two checkouts, two functions) on one machine share MODEL_CACHE_DIR, and each has its own folder
    in it: neither overwrites the other's version 1, though the two differ."""
    changed = tmp_path / "changed-bundle"
    changed.mkdir()
    for path in tiny_bundle.iterdir():
        (changed / path.name).write_bytes(path.read_bytes())
    (changed / "config.json").write_text((tiny_bundle / "config.json").read_text().replace('"Sports"', '"Sport"'))
    other = tmp_path / "other-checkout" / "models" / MODEL_NAME
    mirror_version(changed, other, 1)
    cache = tmp_path / "cache"
    assert "Sports" in serve(mirror_root)({"text": SEED_TEXT})["body"]["probabilities"]
    assert "Sport" in serve(other)({"text": SEED_TEXT})["body"]["probabilities"]
    mine, theirs = (cache_folder(cache, root, root, 1) for root in (mirror_root, other))
    assert sorted(cache.iterdir()) == sorted([mine.parent, theirs.parent])
    kept = {path.name: path.stat().st_ino for path in mine.iterdir()}
    assert "Sports" in serve(mirror_root)({"text": SEED_TEXT})["body"]["probabilities"]  # a new container
    assert {path.name: path.stat().st_ino for path in mine.iterdir()} == kept  # its cache was left alone
    assert (theirs / "config.json").read_bytes() == (changed / "config.json").read_bytes()


def test_the_cache_folder_is_keyed_by_the_store_however_it_is_spelled(lambda_module, tmp_path: Path, monkeypatch):
    settings = lambda_module.Settings.from_env
    monkeypatch.chdir(tmp_path)
    relative = settings({"MODEL_URI": "store/models/x"}).cache_dir
    assert relative.parent == Path("/tmp/models")  # the default MODEL_CACHE_DIR
    assert relative == settings({"MODEL_URI": str(tmp_path / "store" / "models" / "x")}).cache_dir
    assert relative == settings({"MODEL_URI": f"file://{tmp_path}/store/models/x/"}).cache_dir
    s3 = settings({"S3_BUCKET": "b", "MODEL_PREFIX": "models/x/"}).cache_dir
    assert s3 == settings({"MODEL_URI": "s3://b/models/x"}).cache_dir != relative
    assert s3.name == hashlib.sha256(b"s3://b/models/x").hexdigest()[:12]
    assert settings({"MODEL_URI": "s3://b/models/x", "MODEL_CACHE_DIR": "/var/c"}).cache_dir == Path("/var/c", s3.name)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert settings({"MODEL_URI": "store/models/x"}).cache_dir != relative  # another checkout's relative path


def test_verified_files_in_the_cache_are_kept_and_bad_ones_replaced(serve, mirror_root: Path, tmp_path: Path) -> None:
    cached = cache_folder(tmp_path / "cache", mirror_root, mirror_root, 1)
    served_version(serve(mirror_root))
    kept = {p.name: p.stat().st_ino for p in cached.iterdir()}
    (cached / "tokenizer.json").write_text("{}")
    served_version(serve(mirror_root))  # a new container: a fresh store over the same /tmp
    now = {p.name: p.stat().st_ino for p in cached.iterdir()}
    assert now["model.int8.onnx"] == kept["model.int8.onnx"]
    assert now["tokenizer.json"] != kept["tokenizer.json"]
    assert (cached / "tokenizer.json").read_bytes() == (stored_folder(mirror_root, 1) / "tokenizer.json").read_bytes()


def test_promotion_is_picked_up_and_the_old_version_cleaned(serve, mirror_root: Path, tiny_bundle, tmp_path) -> None:
    invoke = serve(mirror_root, MODEL_REFRESH_SECONDS="0")
    assert served_version(invoke) == 1
    mirror_version(tiny_bundle, mirror_root, 2)
    assert served_version(invoke) == 2
    assert not cache_folder(tmp_path / "cache", mirror_root, mirror_root, 1).exists()
    point_champion(stored_folder(mirror_root, 1))  # a rollback is a promotion too
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
    point_champion(folder)


def escape_folder(folder: Path) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["../../escape"] = manifest["files"]["config.json"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    point_champion(folder)


def mislabel_version(folder: Path) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["version"] = 99
    (folder / "manifest.json").write_text(json.dumps(manifest))
    point_champion(folder)


def change_manifest(folder: Path, **fields: object) -> None:
    manifest = json.loads((folder / "manifest.json").read_text()) | fields
    (folder / "manifest.json").write_text(json.dumps(manifest))
    point_champion(folder)


def boolean_manifest_version(folder: Path) -> None:
    change_manifest(folder, version=True)


def null_manifest_version(folder: Path) -> None:
    change_manifest(folder, version=None)


def numeric_file_digest(folder: Path) -> None:
    files = json.loads((folder / "manifest.json").read_text())["files"]
    change_manifest(folder, files=files | {"config.json": {"sha256": 7, "bytes": 1}})


SECRET = Path("/etc/passwd")  # a file outside every store


def link_outside_the_store(folder: Path) -> None:
    """A symlink in the store to a file outside it, with the manifest's digest of that file: all checks pass but
    where the file lies."""
    (folder / "tokenizer.json").unlink()
    (folder / "tokenizer.json").symlink_to(SECRET)
    files = json.loads((folder / "manifest.json").read_text())["files"]
    secret = SECRET.read_bytes()
    entry = {"sha256": hashlib.sha256(secret).hexdigest(), "bytes": len(secret)}
    change_manifest(folder, files=files | {"tokenizer.json": entry})


BAD_VERSIONS = [
    (corrupt, UNVERIFIED, "model.int8.onnx: sha256"),
    (remove_tokenizer, UNREADABLE, "cannot read"),
    (tamper_manifest, UNVERIFIED, "manifest.json: sha256"),
    (drop_from_manifest, UNVERIFIED, "lists no model.int8.onnx"),
    (escape_folder, UNVERIFIED, "file '../../escape' is not a plain file name"),
    (mislabel_version, UNVERIFIED, "manifest.json is for version 99, not"),
    (boolean_manifest_version, UNVERIFIED, "manifest.json: 'version' must not be a boolean"),
    (null_manifest_version, UNVERIFIED, "manifest.json: 'version' is NoneType, not int"),
    (numeric_file_digest, UNVERIFIED, "files['config.json']: 'sha256' is int, not str"),
    (link_outside_the_store, UNVERIFIED, f"tokenizer.json resolves to {SECRET}, outside"),
]
BAD_VERSION_IDS = [spoil.__name__ for spoil, _, _ in BAD_VERSIONS]


@pytest.mark.parametrize(("spoil", "reason", "problem"), BAD_VERSIONS, ids=BAD_VERSION_IDS)
def test_a_bad_new_version_leaves_the_good_one_serving(
    serve, mirror_root: Path, tiny_bundle: Path, caplog: pytest.LogCaptureFixture, spoil, reason, problem: str
) -> None:
    invoke = serve(mirror_root, MODEL_REFRESH_SECONDS="0")
    assert served_version(invoke) == 1
    spoil(mirror_version(tiny_bundle, mirror_root, 2))
    with caplog.at_level(logging.ERROR, logger="agnews"):
        assert served_version(invoke) == 1
    assert any("keeping version 1" in r.message and problem in r.message for r in caplog.records), caplog.text


@pytest.mark.parametrize(("spoil", "reason", "problem"), BAD_VERSIONS, ids=BAD_VERSION_IDS)
def test_a_bad_only_version_gives_503_with_a_short_reason_and_logs_the_details(
    serve, tmp_path: Path, tiny_bundle: Path, caplog: pytest.LogCaptureFixture, spoil, reason: str, problem: str
) -> None:
    root = tmp_path / "root"
    spoil(mirror_version(tiny_bundle, root, 1))
    with caplog.at_level(logging.ERROR, logger="agnews"):
        response = serve(root)({"text": SEED_TEXT})
    assert response == {"statusCode": 503, "body": {"error": reason}}
    assert any(message.startswith("no model to serve: ") and problem in message for message in caplog.messages)
    assert not (tmp_path / "escape").exists()
    # nothing from outside the store reached the cache
    secret = SECRET.read_bytes()
    assert all(path.read_bytes() != secret for path in (tmp_path / "cache").rglob("*") if path.is_file())


def test_a_symlink_within_the_store_is_followed(serve, mirror_root: Path, tiny_bundle: Path) -> None:
    """A store may link a file to another in it, say v2's model to v1's: only links that leave it are refused."""
    folder = mirror_version(tiny_bundle, mirror_root, 2)
    (folder / "model.int8.onnx").unlink()
    (folder / "model.int8.onnx").symlink_to(stored_folder(mirror_root, 1) / "model.int8.onnx")
    assert served_version(serve(mirror_root)) == 2


def test_a_corrupt_champion_pointer_gives_503(serve, mirror_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    (mirror_root / "champion.json").write_text("{not json")
    with caplog.at_level(logging.ERROR, logger="agnews"):
        assert serve(mirror_root)({"text": SEED_TEXT})["body"]["error"] == UNVERIFIED
    assert caplog.messages[0].startswith(f"no model to serve: {mirror_root / 'champion.json'} is not valid JSON")


BAD_POINTERS = [
    ({"version": None}, ": 'version' is NoneType, not int"),
    ({"version": True}, ": 'version' must not be a boolean"),
    ({"version": "1"}, ": 'version' is str, not int"),
    ({"manifest": "../v1/manifest.json"}, ": manifest path part '..' is not a plain file name"),
    ({"manifest_sha256": "not-a-digest"}, ": 'manifest_sha256' is not a sha256 hex digest"),
]


@pytest.mark.parametrize(("change", "problem"), BAD_POINTERS, ids=[problem for _, problem in BAD_POINTERS])
def test_a_pointer_that_breaks_the_contract_gives_503_and_logs_the_field(
    serve, mirror_root: Path, caplog: pytest.LogCaptureFixture, change, problem
) -> None:
    pointer = mirror_root / "champion.json"
    pointer.write_text(json.dumps(json.loads(pointer.read_text()) | change))
    with caplog.at_level(logging.ERROR, logger="agnews"):
        response = serve(mirror_root)({"text": SEED_TEXT})
    assert response == {"statusCode": 503, "body": {"error": UNVERIFIED}}  # never "model_version": null
    assert caplog.messages == [f"no model to serve: {pointer}{problem}"]


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


def test_swap_under_load_fails_no_request(serve, mirror_root: Path, tiny_bundle: Path) -> None:
    invoke = serve(mirror_root, MODEL_REFRESH_SECONDS="0")
    held = invoke.store.get()  # a request in flight on v1
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


class CountingSource:
    """The store's real LocalSource, counting the files it opens."""

    def __init__(self, root: Path) -> None:
        import model_store  # from lambda/, on the path that the lambda_module fixture sets

        self.source = model_store.LocalSource(root)
        self.reads: Counter[str] = Counter()

    def url(self, key: str) -> str:
        return self.source.url(key)

    @contextlib.contextmanager
    def open(self, key: str) -> Iterator[IO[bytes]]:
        self.reads[key] += 1
        with self.source.open(key) as stream:
            yield stream


class Clock:
    """A monotonic clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_without_a_model_the_store_tries_once_per_interval_and_answers_from_memory(
    lambda_module, tmp_path: Path, tiny_bundle: Path
) -> None:
    import model_store

    root = tmp_path / "root"
    v1 = mirror_version(tiny_bundle, root, 1)
    corrupt(v1)
    env = {"MODEL_URI": str(root), "MODEL_CACHE_DIR": str(tmp_path / "cache"), "MODEL_RETRY_SECONDS": "30"}
    source, clock = CountingSource(root), Clock()
    store = model_store.ModelStore(lambda_module.Settings.from_env(env), source=source, clock=clock)
    service = lambda_module.Service(store)

    def answers(requests: int) -> set[tuple[int, str]]:
        responses = [service.handle({"text": SEED_TEXT}, None) for _ in range(requests)]
        return {(response["statusCode"], response["body"].get("error")) for response in responses}

    one_attempt = {"champion.json": 1} | {
        f"{v1.name}/{name}": 1 for name in ("manifest.json", "config.json", "model.int8.onnx")
    }
    assert answers(200) == {(503, UNVERIFIED)}
    assert source.reads == one_attempt  # one download, not 200
    clock.now += 29.9
    assert answers(50) == {(503, UNVERIFIED)}
    assert source.reads == one_attempt
    clock.now += 0.1  # the interval is up: one more attempt (config.json, verified in the cache, is kept)
    assert answers(50) == {(503, UNVERIFIED)}
    assert source.reads == one_attempt | {"champion.json": 2} | {
        f"{v1.name}/{name}": 2 for name in ("manifest.json", "model.int8.onnx")
    }
    mirror_version(tiny_bundle, root, 2)  # fixed in the store: the 503s go on until the next attempt
    assert answers(10) == {(503, UNVERIFIED)}
    assert source.reads["champion.json"] == 2
    clock.now += 30
    assert answers(10) == {(200, None)}
    assert source.reads["champion.json"] == 3


def test_with_no_retry_interval_every_request_tries(lambda_module, tmp_path: Path) -> None:
    import model_store

    env = {"MODEL_URI": str(tmp_path / "none"), "MODEL_RETRY_SECONDS": "0"}
    source = CountingSource(tmp_path / "none")
    service = lambda_module.Service(model_store.ModelStore(lambda_module.Settings.from_env(env), source=source))
    assert {service.handle({"text": SEED_TEXT}, None)["statusCode"] for _ in range(5)} == {503}
    assert source.reads == {"champion.json": 5}


def test_the_retry_interval_is_a_setting(serve, tmp_path: Path, tiny_bundle: Path) -> None:
    """Through the handler's environment: a store fixed within MODEL_RETRY_SECONDS is not seen until it is up."""
    root = tmp_path / "root"
    corrupt(mirror_version(tiny_bundle, root, 1))
    invoke = serve(root, MODEL_RETRY_SECONDS="3600")
    assert invoke({"text": SEED_TEXT})["statusCode"] == 503
    mirror_version(tiny_bundle, root, 2)
    assert invoke({"text": SEED_TEXT})["statusCode"] == 503
    assert served_version(serve(root, MODEL_RETRY_SECONDS="0")) == 2  # a new container tries at once
