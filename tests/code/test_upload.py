"""The upload step: local and S3 stores, idempotence, interrupted uploads, the checked reader, and the CLI."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import boto3
import pytest
import yaml
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

import agnews.ingest
from agnews.config import PROJECT_ROOT, code_version
from agnews.data import INFO, read_info, read_split
from agnews.errors import DataError, StorageError
from agnews.ingest import upload
from agnews.storage import Storage, open_storage

PREFIX = "datasets/ag_news"
KEYS = [f"{PREFIX}/info.json", f"{PREFIX}/test.jsonl", f"{PREFIX}/train.jsonl"]
LABELS = ["World", "Sports", "Business", "Sci/Tech"]


def write_source(folder: Path, rows: list[tuple[str, int]]) -> Path:
    """An AG News folder: train.csv in the original form (class 1-4), test.jsonl (label 0-3)."""
    folder.mkdir(parents=True)
    (folder / "train.csv").write_text("".join(f'"{y + 1}","{t}","body of {t}"\n' for t, y in rows))
    (folder / "test.jsonl").write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows[:2]))
    return folder


ROWS_A = [("Oil prices rise", 2), ("Team wins", 1), ("New chip", 3), ("Peace talks", 0)]
ROWS_B = [("Markets fall", 2), ("Final score", 1), ("Rocket launch", 3), ("Election day", 0), ("More news", 0)]


def rows(storage: Storage, split: str) -> list[tuple[str, int]]:
    frame = read_split(storage, PREFIX, split)
    return list(zip(frame.text, frame.label.astype(int), strict=True))


def expected(source: list[tuple[str, int]], split: str) -> list[tuple[str, int]]:
    return [(f"{t} body of {t}", y) for t, y in source] if split == "train" else source[:2]


class Recorded:
    """A real store that records its writes and fails the one whose key is ``fail_on``, like a dropped upload."""

    def __init__(self, store: Storage, fail_on: str | None = None) -> None:
        self.store, self.fail_on, self.writes = store, fail_on, []

    def __getattr__(self, name: str):
        return getattr(self.store, name)

    def _write(self, key: str) -> None:
        self.writes.append(key)
        if key == self.fail_on:
            raise StorageError(f"injected fault writing {key}")

    def write_bytes(self, key: str, data: bytes) -> None:
        self._write(key)
        self.store.write_bytes(key, data)

    def copy(self, src: str, dst: str) -> None:
        self._write(dst)
        self.store.copy(src, dst)

    def delete(self, key: str) -> None:
        self._write(key)
        self.store.delete(key)


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> Callable[[str | None], list[Recorded]]:
    """Make the upload step open its store through Recorded; returns the stores it opened."""

    def install(fail_on: str | None = None) -> list[Recorded]:
        opened: list[Recorded] = []

        def open_recorded(cfg: DictConfig) -> Recorded:
            opened.append(Recorded(open_storage(cfg), fail_on))
            return opened[-1]

        monkeypatch.setattr(agnews.ingest, "open_storage", open_recorded)
        return opened

    return install


@pytest.fixture(params=["local", "s3"])
def store_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return str(tmp_path / "store") if request.param == "local" else f"s3://{request.getfixturevalue('bucket')}"


def test_upload_local_then_s3(tmp_path: Path, make_cfg, s3_env: str, bucket: str, recorded, caplog) -> None:
    caplog.set_level(logging.INFO, logger="agnews")
    source = write_source(tmp_path / "src", ROWS_A)
    local_cfg = make_cfg(f"data.source={source}")
    splits, info, changed = upload(local_cfg)
    assert changed
    store = tmp_path / "store"
    assert sorted(p.relative_to(store).as_posix() for p in store.rglob("*") if p.is_file()) == KEYS
    assert info == json.loads((store / PREFIX / INFO).read_bytes())
    for name in ("train.jsonl", "test.jsonl"):
        data = (store / PREFIX / name).read_bytes()
        assert info["files"][name] == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    assert info["labels"] == LABELS
    assert info["counts"]["train"] == {"rows": 4, "per_class": dict.fromkeys(LABELS, 1)}
    assert info["counts"]["test"] == {"rows": 2, "per_class": {"World": 0, "Sports": 1, "Business": 1, "Sci/Tech": 0}}
    assert (info["source"], info["code_version"]) == (str(source), code_version())
    local = open_storage(local_cfg)
    for split in ("train", "test"):
        assert rows(local, split) == expected(ROWS_A, split)
        assert splits[split].equals(read_split(local, PREFIX, split))

    s3_cfg = make_cfg(f"data.source={source}", f"storage.uri=s3://{bucket}")
    assert upload(s3_cfg)[2]
    client = boto3.client("s3", endpoint_url=s3_env)
    assert sorted(obj["Key"] for obj in client.list_objects_v2(Bucket=bucket)["Contents"]) == KEYS
    for name in ("train.jsonl", "test.jsonl"):
        assert client.get_object(Bucket=bucket, Key=f"{PREFIX}/{name}")["Body"].read() == local.read_bytes(
            f"{PREFIX}/{name}"
        )

    for cfg in (local_cfg, s3_cfg):
        caplog.clear()
        opened = recorded()
        _, again, changed = upload(cfg)
        assert not changed
        assert opened[0].writes == []
        assert again == read_info(open_storage(cfg), PREFIX)
        assert "already up to date: nothing uploaded" in caplog.text


@pytest.mark.parametrize(
    ("fail_on", "survivor"),
    [(f"{PREFIX}/{INFO}", ROWS_A), (f"{PREFIX}/train.jsonl", ROWS_B)],
    ids=["before-commit", "after-commit"],
)
def test_interrupted_upload(tmp_path: Path, make_cfg, store_uri: str, recorded, fail_on: str, survivor) -> None:
    """A run that dies before info.json keeps the old dataset; after info.json, the new one; both stay readable."""
    cfg_a = make_cfg(f"data.source={write_source(tmp_path / 'a', ROWS_A)}", f"storage.uri={store_uri}")
    cfg_b = make_cfg(f"data.source={write_source(tmp_path / 'b', ROWS_B)}", f"storage.uri={store_uri}")
    upload(cfg_a)
    recorded(fail_on)
    with pytest.raises(StorageError, match="injected fault"):
        upload(cfg_b)
    store = open_storage(cfg_a)
    for split in ("train", "test"):
        assert rows(store, split) == expected(survivor, split)
    assert read_info(store, PREFIX)["counts"]["train"]["rows"] == len(survivor)

    opened = recorded()
    assert upload(cfg_b)[2]
    assert f"{PREFIX}/{INFO}" in opened[0].writes
    assert rows(store, "train") == expected(ROWS_B, "train")
    assert store.list("") == KEYS


def test_read_split_errors(tmp_path: Path, make_cfg) -> None:
    cfg = make_cfg(f"data.source={write_source(tmp_path / 'src', ROWS_A)}")
    store = open_storage(cfg)
    with pytest.raises(DataError, match=f"^no dataset at {store.url(PREFIX)}: run the upload step first$"):
        read_split(store, PREFIX, "train")
    upload(cfg)
    store.write_bytes(f"{PREFIX}/train.jsonl", b'{"text": "tampered", "label": 0}\n')
    with pytest.raises(DataError) as caught:
        read_split(store, PREFIX, "train")
    assert str(caught.value) == (
        f"{store.url(f'{PREFIX}/train.jsonl')}: sha256 does not match info.json (corrupt or half-written); "
        "run the upload step again"
    )
    store.delete(f"{PREFIX}/test.jsonl")
    with pytest.raises(DataError, match=r"/test\.jsonl is missing: run the upload step again$"):
        read_split(store, PREFIX, "test")


# --- the real command line, on the real AG News files, into S3 on the moto server ---


@pytest.fixture(scope="module")
def cli(moto_server: str, agnews_dir: Path, mlflow_db: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Run `python -m steps.upload` once, from an empty working folder, into a fresh bucket."""
    env = {key: value for key, value in os.environ.items() if key not in ("MLFLOW_TRACKING_URI", "S3_BUCKET")}
    env.update(
        S3_ENDPOINT_URL=moto_server,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_REGION="us-east-1",
        PYTHONPATH=str(PROJECT_ROOT),
    )
    bucket = "agnews-cli-upload"
    boto3.client(
        "s3",
        endpoint_url=moto_server,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    ).create_bucket(Bucket=bucket)
    cwd = tmp_path_factory.mktemp("cwd")
    tracking = f"sqlite:///{shutil.copy(mlflow_db, tmp_path_factory.mktemp('mlflow'))}"

    def run(*overrides: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "steps.upload", f"storage.uri=s3://{bucket}", f"tracking.uri={tracking}"]
        return subprocess.run(
            [*command, *overrides], cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False
        )

    done = run(f"data.source={agnews_dir}")
    assert done.returncode == 0, done.stderr
    client = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1", **creds(env))
    return {"run": run, "env": env, "bucket": bucket, "cwd": cwd, "tracking": tracking, "s3": client}


def creds(env: dict[str, str]) -> dict[str, str]:
    return {"aws_access_key_id": env["AWS_ACCESS_KEY_ID"], "aws_secret_access_key": env["AWS_SECRET_ACCESS_KEY"]}


def test_cli_puts_three_objects(cli: dict, moto_server: str) -> None:
    aws = Path(sys.executable).parent / "aws"
    listing = subprocess.run(
        [aws, "s3", "ls", f"s3://{cli['bucket']}", "--recursive", "--endpoint-url", moto_server],
        env=cli["env"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert sorted(line.split()[-1] for line in listing.splitlines()) == KEYS
    s3, bucket = cli["s3"], cli["bucket"]
    info = json.loads(s3.get_object(Bucket=bucket, Key=f"{PREFIX}/{INFO}")["Body"].read())
    for name in ("train.jsonl", "test.jsonl"):
        data = s3.get_object(Bucket=bucket, Key=f"{PREFIX}/{name}")["Body"].read()
        assert info["files"][name] == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    assert info["counts"]["train"]["rows"] == 22260
    assert info["counts"]["test"] == {"rows": 7600, "per_class": dict.fromkeys(LABELS, 1900)}
    assert list(cli["cwd"].iterdir()) == []


def test_cli_logs_mlflow_run(cli: dict, agnews_dir: Path) -> None:
    client = MlflowClient(cli["tracking"])
    experiment = client.get_experiment_by_name("agnews")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.data.tags["step"] == "upload"
    assert run.data.tags["git_commit"] == code_version()
    assert run.data.params["data.source"] == str(agnews_dir)
    assert run.data.params["storage.uri"] == f"s3://{cli['bucket']}"
    assert run.data.metrics["rows_train"] == 22260
    assert run.data.metrics["rows_test"] == 7600
    assert run.data.metrics["rows_test_business"] == 1900
    inputs = {d.tags[0].value: d.dataset for d in run.inputs.dataset_inputs}
    assert sorted(inputs) == ["test", "train"]
    for split, dataset in inputs.items():
        assert dataset.name == f"ag_news-{split}"
        assert json.loads(dataset.source)["uri"] == f"s3://{cli['bucket']}/{PREFIX}/{split}.jsonl"
        assert dataset.digest
        assert json.loads(dataset.profile)["num_rows"] == {"train": 22260, "test": 7600}[split]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", INFO} <= artifacts
    config = yaml.safe_load(Path(client.download_artifacts(run.info.run_id, "config.yaml")).read_text())
    assert config["data"]["source"] == str(agnews_dir)


def test_cli_bad_input_is_one_line(cli: dict, agnews_dir: Path, tmp_path: Path) -> None:
    s3, bucket = cli["s3"], cli["bucket"]
    before = {o["Key"]: o["ETag"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]}
    bad = tmp_path / "train.csv"
    bad.write_text('"1","a","b"\n"7","c","d"\n')
    done = cli["run"](f"data.train_file={bad}", f"data.test_file={agnews_dir / 'test.csv'}")
    assert done.returncode == 1
    assert done.stderr == f"error: {bad}:2: label 7 out of range 1-4\n"
    assert {o["Key"]: o["ETag"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]} == before


def test_upload_repairs_a_corrupt_file_of_the_same_size(
    tmp_path: Path, make_cfg, store_uri: str, recorded, caplog
) -> None:
    """One changed letter keeps the size: upload reads the file back, sees the wrong sha256 and uploads again,
    and the trainer's checked reader then reads the dataset."""
    caplog.set_level(logging.INFO, logger="agnews")
    cfg = make_cfg(f"data.source={write_source(tmp_path / 'src', ROWS_A)}", f"storage.uri={store_uri}")
    upload(cfg)
    store = open_storage(cfg)
    key = f"{PREFIX}/train.jsonl"
    good = store.read_bytes(key)
    corrupt = good.replace(b"Oil prices rise", b"Oil prices rose", 1)
    assert len(corrupt) == len(good) and corrupt != good
    store.write_bytes(key, corrupt)
    with pytest.raises(DataError, match=r"sha256 does not match info\.json"):
        read_split(store, PREFIX, "train")

    opened = recorded()
    _, _, changed = upload(cfg)
    assert changed and key in opened[0].writes
    assert "already up to date" not in caplog.text
    assert store.read_bytes(key) == good
    assert rows(store, "train") == expected(ROWS_A, "train")
    assert store.list("") == KEYS
