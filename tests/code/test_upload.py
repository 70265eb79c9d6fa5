"""The upload step: local and S3 stores, idempotence, interrupted and concurrent uploads, the checked reader, and the
CLI."""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path

import boto3
import pytest
import yaml
from mlflow.tracking import MlflowClient

import agnews.upload
from agnews.config import PROJECT_ROOT, code_version, compose
from agnews.data import INFO, read_info, read_split
from agnews.errors import DataError, PipelineError, StorageError
from agnews.settings import StorageSettings
from agnews.storage import Storage, open_storage
from agnews.upload import upload
from tests.helpers import LABELS, moto_environ

PREFIX = "datasets/ag_news"
KEYS = [f"{PREFIX}/info.json", f"{PREFIX}/test.jsonl", f"{PREFIX}/train.jsonl"]


def write_source(folder: Path, rows: list[tuple[str, int]]) -> Path:
    """An AG News folder: train.csv in the original form (class 1-4), test.jsonl (label 0-3)."""
    folder.mkdir(parents=True)
    (folder / "train.csv").write_text("".join(f'"{y + 1}","{t}","body of {t}"\n' for t, y in rows))
    (folder / "test.jsonl").write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows[:2]))
    return folder


ROWS_A = [("Oil prices rise", 2), ("Team wins", 1), ("New chip", 3), ("Peace talks", 0)]
ROWS_B = [("Markets fall", 2), ("Final score", 1), ("Rocket launch", 3), ("Election day", 0), ("More news", 0)]
ROWS_C = [("Rates hold", 2), ("Cup final", 1), ("Chip shortage", 3)]


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


class LosesStaged(Recorded):
    """A store in which each staged file is removed just before it is moved into place, as another process that
    does not hold the upload lease would."""

    def copy(self, src: str, dst: str) -> None:
        self.store.delete(src)
        super().copy(src, dst)


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> Callable[..., list[Recorded]]:
    """Make the upload step open its store through Recorded (or a subclass); returns the stores it opened."""

    def install(fail_on: str | None = None, kind: type[Recorded] = Recorded) -> list[Recorded]:
        opened: list[Recorded] = []

        def open_recorded(storage: StorageSettings) -> Recorded:
            opened.append(kind(open_storage(storage), fail_on))
            return opened[-1]

        monkeypatch.setattr(agnews.upload, "open_storage", open_recorded)
        return opened

    return install


@pytest.fixture(params=["local", "s3"])
def store_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return str(tmp_path / "store") if request.param == "local" else f"s3://{request.getfixturevalue('bucket')}"


def test_upload_local_then_s3(tmp_path: Path, make_cfg, s3_env: str, bucket: str, recorded, caplog) -> None:
    caplog.set_level(logging.INFO, logger="agnews")
    source = write_source(tmp_path / "src", ROWS_A)
    local_cfg = make_cfg(f"data.source={source}")
    splits, info, changed = upload(local_cfg.data, local_cfg.storage)
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
    local = open_storage(local_cfg.storage)
    for split in ("train", "test"):
        assert rows(local, split) == expected(ROWS_A, split)
        assert splits[split].equals(read_split(local, PREFIX, split))

    s3_cfg = make_cfg(f"data.source={source}", f"storage.uri=s3://{bucket}")
    assert upload(s3_cfg.data, s3_cfg.storage)[2]
    client = boto3.client("s3", endpoint_url=s3_env)
    assert sorted(obj["Key"] for obj in client.list_objects_v2(Bucket=bucket)["Contents"]) == KEYS
    for name in ("train.jsonl", "test.jsonl"):
        assert client.get_object(Bucket=bucket, Key=f"{PREFIX}/{name}")["Body"].read() == local.read_bytes(
            f"{PREFIX}/{name}"
        )

    for cfg in (local_cfg, s3_cfg):
        caplog.clear()
        opened = recorded()
        _, again, changed = upload(cfg.data, cfg.storage)
        assert not changed
        assert opened[0].writes == []
        assert again == read_info(open_storage(cfg.storage), PREFIX)
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
    upload(cfg_a.data, cfg_a.storage)
    recorded(fail_on)
    with pytest.raises(StorageError, match="injected fault"):
        upload(cfg_b.data, cfg_b.storage)
    store = open_storage(cfg_a.storage)
    for split in ("train", "test"):
        assert rows(store, split) == expected(survivor, split)
    assert read_info(store, PREFIX)["counts"]["train"]["rows"] == len(survivor)

    opened = recorded()
    assert upload(cfg_b.data, cfg_b.storage)[2]
    assert f"{PREFIX}/{INFO}" in opened[0].writes
    assert rows(store, "train") == expected(ROWS_B, "train")
    assert store.list("") == KEYS


def test_read_split_errors(tmp_path: Path, make_cfg) -> None:
    cfg = make_cfg(f"data.source={write_source(tmp_path / 'src', ROWS_A)}")
    store = open_storage(cfg.storage)
    with pytest.raises(DataError, match=f"^no dataset at {store.url(PREFIX)}: run the upload step first$"):
        read_split(store, PREFIX, "train")
    upload(cfg.data, cfg.storage)
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
    return {"run": run, "env": env, "bucket": bucket, "cwd": cwd, "tracking": tracking, "s3": client, "first": done}


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


def test_cli_prints_no_schema_hint(cli: dict) -> None:
    """MLflow hints that an integer column cannot hold missing values each time it infers a dataset's schema (twice
    per split); labels never miss, so the step keeps it off its output."""
    output = cli["first"].stdout + cli["first"].stderr
    assert "uploaded train.jsonl, test.jsonl to s3://" in output
    assert "Integer columns" not in output
    assert "Warning" not in output


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
    upload(cfg.data, cfg.storage)
    store = open_storage(cfg.storage)
    key = f"{PREFIX}/train.jsonl"
    good = store.read_bytes(key)
    corrupt = good.replace(b"Oil prices rise", b"Oil prices rose", 1)
    assert len(corrupt) == len(good) and corrupt != good
    store.write_bytes(key, corrupt)
    with pytest.raises(DataError, match=r"sha256 does not match info\.json"):
        read_split(store, PREFIX, "train")

    opened = recorded()
    _, _, changed = upload(cfg.data, cfg.storage)
    assert changed and key in opened[0].writes
    assert "already up to date" not in caplog.text
    assert store.read_bytes(key) == good
    assert rows(store, "train") == expected(ROWS_A, "train")
    assert store.list("") == KEYS


def test_upload_repairs_a_tampered_info_json(tmp_path: Path, make_cfg, store_uri: str, recorded, caplog) -> None:
    """The files are intact but info.json's row count was changed: every field that describes the dataset is
    compared, so the upload writes info.json again; who wrote it, when and from where (its provenance) is not."""
    caplog.set_level(logging.INFO, logger="agnews")
    source = write_source(tmp_path / "src", ROWS_A)
    cfg = make_cfg(f"data.source={source}", f"storage.uri={store_uri}")
    _, info, _ = upload(cfg.data, cfg.storage)
    store = open_storage(cfg.storage)
    tampered = json.loads(json.dumps(info))
    tampered["counts"]["train"]["rows"] = 999
    store.write_bytes(f"{PREFIX}/{INFO}", json.dumps(tampered).encode())

    opened = recorded()
    _, again, changed = upload(cfg.data, cfg.storage)
    assert changed and f"{PREFIX}/{INFO}" in opened[0].writes
    assert read_info(store, PREFIX)["counts"] == again["counts"] == info["counts"]

    shutil.copytree(source, tmp_path / "elsewhere")
    opened = recorded()
    elsewhere = make_cfg(f"data.source={tmp_path / 'elsewhere'}", f"storage.uri={store_uri}")
    _, kept, changed = upload(elsewhere.data, elsewhere.storage)
    assert not changed and opened[0].writes == []
    assert kept["source"] == str(source)
    assert "already up to date: nothing uploaded" in caplog.text


def test_a_staged_file_that_went_missing_is_named(tmp_path: Path, make_cfg, store_uri: str, recorded) -> None:
    cfg = make_cfg(f"data.source={write_source(tmp_path / 'src', ROWS_A)}", f"storage.uri={store_uri}")
    recorded(kind=LosesStaged)
    with pytest.raises(DataError) as caught:
        upload(cfg.data, cfg.storage)
    staged = re.escape(f"{open_storage(cfg.storage).url(PREFIX)}/.staging/")
    assert re.fullmatch(
        rf"the staged {staged}[0-9a-f]{{64}}/train\.jsonl went missing before it was moved into place \(removed by "
        r"a process that does not hold the upload lease\?\): run the upload step again",
        str(caught.value),
    ), caught.value


# --- concurrent uploads, each in its own process ---

UPLOADERS = 3
UPLOAD_ROUNDS = 4


def uploader(inbox: Queue, outbox: Queue, start: Barrier, env: dict[str, str]) -> None:
    """An upload process: for each job, compose its config, wait for the others at ``start``, upload, report."""
    os.environ.update(env)
    while (overrides := inbox.get()) is not None:
        cfg = compose(overrides)
        start.wait()
        try:
            outbox.put({"changed": upload(cfg.data, cfg.storage)[2]})
        except PipelineError as exc:
            outbox.put({"error": str(exc)})
        except Exception as exc:  # reported, so that the test fails with it instead of waiting for the process
            outbox.put({"error": f"{type(exc).__name__}: {exc}"})


@pytest.fixture(scope="module")
def uploaders(moto_server: str, atomic_conditional_writes: None) -> Iterator[Callable[[list[list[str]]], list[dict]]]:
    """Spawned upload processes, kept for every round; run one job each, all started together by a barrier."""
    context = multiprocessing.get_context("spawn")
    start, outbox = context.Barrier(UPLOADERS), context.Queue()
    inboxes = [context.Queue() for _ in range(UPLOADERS)]
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "S3_BUCKET")}
    env |= moto_environ(moto_server)
    processes = [context.Process(target=uploader, args=(inbox, outbox, start, env), daemon=True) for inbox in inboxes]
    for process in processes:
        process.start()

    def run(jobs: list[list[str]]) -> list[dict]:
        for inbox, job in zip(inboxes, jobs, strict=True):
            inbox.put(job)
        return [outbox.get(timeout=300) for _ in jobs]

    yield run
    for inbox in inboxes:
        inbox.put(None)
    for process in processes:
        process.join(timeout=30)
        if process.is_alive():
            process.kill()


def test_concurrent_uploads_end_as_if_serial(tmp_path: Path, store_uri: str, uploaders) -> None:
    """Rounds of three uploads of different data at once: each holds the dataset's lease, so none fails and
    every round ends with one upload's complete dataset (its sha256 checked, its info.json), and nothing staged or
    locked left behind."""
    sources = {
        str(write_source(tmp_path / name, data)): data for name, data in (("a", ROWS_A), ("b", ROWS_B), ("c", ROWS_C))
    }
    folders = list(sources)
    store = open_storage(compose([f"storage.uri={store_uri}"]).storage)
    for round_number in range(UPLOAD_ROUNDS):
        jobs = [
            [f"data.source={folders[(i + round_number) % len(folders)]}", f"storage.uri={store_uri}"]
            for i in range(UPLOADERS)
        ]
        results = uploaders(jobs)
        assert [r for r in results if "error" in r] == [], f"round {round_number}: {results}"
        info = read_info(store, PREFIX)
        data = sources[info["source"]]
        for split in ("train", "test"):
            assert rows(store, split) == expected(data, split), f"round {round_number}"
        assert info["counts"]["train"]["rows"] == len(data)
        assert store.list("") == KEYS
