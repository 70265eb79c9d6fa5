"""register and mirror against a real `mlflow server` (SQLite, artifacts on moto S3), and against local SQLite.

Two tiny training runs on the server (a worse one, then a better one: the session's ``train_runs``) and one in a
local SQLite store are shared by every test; each test registers them under its own model name, so the tests do not
see each other's versions.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import boto3
import mlflow
import pytest
import requests
from mlflow import MlflowClient

from agnews.config import compose
from agnews.errors import ConfigError, RegistryError, StorageError
from agnews.names import CHALLENGER, CHAMPION, PREVIOUS, PROMOTED_BY, RECORDED_CHAMPION, TEST_ROWS_TAG
from agnews.promotion.gate import TestSet, gate
from agnews.promotion.mirror import mirror
from agnews.promotion.register import register
from agnews.promotion.registry import Verdict, aliases
from agnews.settings import Settings
from agnews.storage import LocalStorage, open_storage
from agnews.tracking import connect, step_run
from agnews.training import train
from agnews.upload import upload_and_log
from bundle.layout import MANIFEST, POINTER, REFERENCE, sha256
from tests.helpers import TrainRuns, free_port, require_agnews, run_step, s3_environment, use_credentials

QUICK = ["preset=test", "train.epochs=0.3"]
EXPERIMENT = "registry-tests"  # the experiment of the session's train runs (tests/conftest.py)
BUNDLE = ["config.json", "model.int8.onnx", "tokenizer.json"]


@pytest.fixture(scope="module")
def moto_env(moto_server: str) -> Iterator[str]:
    """The S3 variables for the whole module (its fixtures outlive a test's monkeypatch)."""
    with s3_environment(moto_server):
        yield moto_server


@pytest.fixture(scope="module")
def server_cfg(mlflow_server: str, moto_env: str, train_runs: TrainRuns, tmp_path_factory: pytest.TempPathFactory):
    """Compose a config that tracks to the server and reads the dataset from the train runs' bucket."""
    checkpoints = tmp_path_factory.mktemp("checkpoints")

    def make(*overrides: str) -> Settings:
        return compose(
            [
                f"tracking.uri={mlflow_server}",
                f"tracking.experiment={EXPERIMENT}",
                f"storage.uri=s3://{train_runs.data_bucket}",
                f"train.output_dir={checkpoints}",
                f"data.source={require_agnews()}",
                *overrides,
            ]
        )

    return make


@pytest.fixture(scope="module")
def runs(train_runs: TrainRuns) -> TrainRuns:
    """The upload, a deliberately worse training run, then a better (and so the newest) one: the session's."""
    return train_runs


@pytest.fixture
def model_cfg(server_cfg, bucket: str, request: pytest.FixtureRequest):
    """Configs for this test: its own registered model name and its own bucket for the mirror."""
    name = request.node.name.replace("_", "-")

    def make(*overrides: str) -> Settings:
        return server_cfg(f"registry.model_name={name}", f"storage.uri=s3://{bucket}", *overrides)

    return make


def run_register(cfg: Settings) -> Verdict:
    with step_run(cfg, "register"):
        return register(cfg.registry, cfg.storage, cfg.tracking.experiment, cfg.registry.run_id)


def run_mirror(cfg: Settings):
    connect(cfg.tracking)
    return mirror(cfg.registry, cfg.storage)


def cli(step: str, cfg: Settings, *overrides: str) -> subprocess.CompletedProcess:
    """``python -m steps.<step>`` with the test's tracking, storage and registry settings."""
    settings = [
        f"tracking.uri={cfg.tracking.uri}",
        f"tracking.experiment={cfg.tracking.experiment}",
        f"storage.uri={cfg.storage.uri}",
        f"registry.model_name={cfg.registry.model_name}",
    ]
    return run_step(step, *settings, *overrides)


def objects(bucket: str) -> dict[str, bytes]:
    """Every object in the bucket, read back with boto3."""
    s3 = boto3.client("s3", endpoint_url=os.environ["S3_ENDPOINT_URL"])
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    return {key: s3.get_object(Bucket=bucket, Key=key)["Body"].read() for key in keys}


def folder_of(files: dict[str, bytes], root: str) -> str:
    """The version folder that the pointer names."""
    return json.loads(files[f"{root}/{POINTER}"])["manifest"].split("/")[0]


def assert_mirrored(files: dict[str, bytes], root: str, version: int, run_id: str) -> None:
    """The pointer names v<version>-<the first 12 hex digits of its manifest's sha256>, whose manifest matches the
    sha256 and size of every file beside it."""
    pointer = json.loads(files[f"{root}/{POINTER}"])
    folder = folder_of(files, root)
    assert pointer["version"] == version and pointer["manifest"] == f"{folder}/{MANIFEST}"
    manifest_bytes = files[f"{root}/{folder}/{MANIFEST}"]
    assert folder == f"v{version}-{sha256(manifest_bytes)[:12]}"
    assert pointer["manifest_sha256"] == sha256(manifest_bytes)
    manifest = json.loads(manifest_bytes)
    assert manifest["version"] == version and manifest["run_id"] == run_id
    assert {"test_accuracy", "test_f1_macro", "onnx_int8_accuracy", "onnx_int8_agreement"} <= manifest["metrics"].keys()
    assert sorted(manifest["files"]) == BUNDLE
    for name, meta in manifest["files"].items():
        data = files[f"{root}/{folder}/{name}"]
        assert meta == {"sha256": sha256(data), "bytes": len(data)}, name


def accuracy(cfg: Settings, run_id: str) -> float:
    return MlflowClient(cfg.tracking.uri).get_run(run_id).data.metrics["test_accuracy"]


TEST_SET = TestSet("a" * 64, 200)


def test_gate_needs_min_accuracy_behaviour_and_tolerance_against_the_champion() -> None:
    registry = compose(
        ["registry.min_accuracy=0.5", "registry.tolerance=0.01", "registry.min_behaviour_pass_rate=0.7"]
    ).registry
    assert gate(registry, 0.6, 0.7, None, None, TEST_SET)[0]
    assert gate(registry, 0.595, 0.9, 2, 0.6, TEST_SET, TEST_SET) == (
        True,
        "promoted by the production gate: test accuracy 0.5950 is at least registry.min_accuracy 0.5; behavioural "
        "pass rate 0.9000 is at least registry.min_behaviour_pass_rate 0.7; test accuracy 0.5950 is at least champion "
        "v2's 0.6000 minus registry.tolerance 0.01; the same test set sha256 aaaaaaaaaaaa, 200 rows as champion v2",
    )
    passed, reason = gate(registry, 0.58, 0.9, 2, 0.6, TEST_SET, TEST_SET)
    assert not passed and "below champion v2's 0.6000 minus registry.tolerance 0.01" in reason
    passed, reason = gate(registry, 0.4, 0.9, 2, 0.3, TEST_SET, TEST_SET)
    assert (
        not passed
        and reason == "rejected by the production gate: test accuracy 0.4000 is below registry.min_accuracy 0.5"
    )
    passed, reason = gate(registry, 0.9, 0.69, 2, 0.6, TEST_SET, TEST_SET)
    assert not passed and reason == (
        "rejected by the production gate: behavioural pass rate 0.6900 is below registry.min_behaviour_pass_rate 0.7"
    )


def test_the_gate_judges_each_number_with_mlflows_model_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each floor goes through the real ``mlflow.validate_evaluation_results``, watched here: the accuracy and
    behaviour floors, and with a comparable champion its accuracy minus the tolerance; with a champion on another test
    set only the floors."""
    judged: list[tuple[str, float, float]] = []
    validate = mlflow.validate_evaluation_results

    def watched(thresholds, candidate, baseline=None):
        judged.extend((name, candidate.metrics[name], bound.threshold) for name, bound in thresholds.items())
        return validate(thresholds, candidate, baseline)

    monkeypatch.setattr(mlflow, "validate_evaluation_results", watched)
    registry = compose(
        ["registry.min_accuracy=0.5", "registry.tolerance=0.01", "registry.min_behaviour_pass_rate=0.7"]
    ).registry
    assert not gate(registry, 0.58, 0.9, 2, 0.6, TEST_SET, TEST_SET)[0]
    floors = [("test_accuracy", 0.58, 0.5), ("behaviour_pass_rate", 0.9, 0.7)]
    assert judged == [*floors, ("test_accuracy", 0.58, 0.6 - 0.01)]
    judged.clear()
    assert not gate(registry, 0.58, 0.9, 2, 0.6, TestSet("b" * 64, 200), TEST_SET)[0]
    assert judged == floors


def test_gate_compares_with_the_champion_only_on_the_same_test_set() -> None:
    """The issue's attack: a model evaluated on a test split of one class scores 1.0; it is not comparable with a
    champion evaluated on the full split, however the numbers compare. The minimums still apply."""
    registry = compose(["registry.min_accuracy=0.5", "registry.min_behaviour_pass_rate=0.7"]).registry
    business_only = TestSet("b" * 64, 1900)
    passed, reason = gate(registry, 1.0, 1.0, 3, 0.9, business_only, TEST_SET)
    assert not passed and reason == (
        "rejected by the production gate: not comparable: it was evaluated on test set sha256 bbbbbbbbbbbb, 1900 rows, "
        "champion v3 on test set sha256 aaaaaaaaaaaa, 200 rows"
    )
    fewer_rows = TestSet("a" * 64, 100)  # the same file, evaluated on a sample of it
    assert (
        "not comparable: it was evaluated on test set sha256 aaaaaaaaaaaa, 100 rows"
        in gate(registry, 1.0, 1.0, 3, 0.9, fewer_rows, TEST_SET)[1]
    )
    passed, reason = gate(registry, 1.0, 1.0, 3, 0.9, TEST_SET, None)
    assert not passed and reason == (
        "rejected by the production gate: not comparable: champion v3 has no test set identity (tags "
        "dataset.test.sha256 and dataset.test.rows)"
    )
    passed, reason = gate(registry, 1.0, 1.0, None, None, None)
    assert not passed and "not comparable: the candidate has no test set identity" in reason
    passed, reason = gate(registry, 0.4, 1.0, 3, 0.3, business_only, TEST_SET)
    assert not passed and reason.endswith("; test accuracy 0.4000 is below registry.min_accuracy 0.5")
    assert TestSet.of({"dataset.test.sha256": "a" * 64, "dataset.test.rows": "200"}) == TEST_SET
    assert TestSet.of({"dataset.test.sha256": "a" * 64}) is None


def test_register_cli_makes_version_1_champion_and_mirrors_it(model_cfg, runs: TrainRuns, bucket: str) -> None:
    cfg = model_cfg()
    name = cfg.registry.model_name
    result = cli(
        "register", cfg, "registry.min_accuracy=0", "registry.min_behaviour_pass_rate=0"
    )  # the default run: the newest finished train run
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"{name} v1 is @champion: promoted" in result.stdout

    client = MlflowClient(cfg.tracking.uri)
    version = client.get_model_version(name, "1")
    train_run = client.get_run(runs.good)
    assert version.run_id == runs.good and version.aliases == [CHAMPION]
    assert version.tags["run_id"] == runs.good
    assert version.tags["git_commit"] == train_run.data.tags["git_commit"]
    for split in ("train", "test"):
        key = f"dataset.{split}.sha256"
        assert version.tags[key] == train_run.data.tags[key]
    assert version.tags["dataset.test.rows"] == train_run.data.tags["dataset.test.rows"] == "200"
    assert float(version.tags["test_accuracy"]) == train_run.data.metrics["test_accuracy"]
    assert float(version.tags["test_f1_macro"]) == train_run.data.metrics["test_f1_macro"]
    assert version.tags["gate"].startswith("promoted by the production gate: test accuracy")
    assert version.tags[PROMOTED_BY] == "gate"
    assert client.get_registered_model(name).tags[RECORDED_CHAMPION] == "1"
    assert version.description.startswith(f"tiny-distilbert from train run {runs.good}")
    assert "test accuracy" in version.description
    assert client.get_registered_model(name).description
    assert version.current_stage in (None, "None"), "aliases only: stages are deprecated"

    files = objects(bucket)
    root = f"models/{name}"
    folder = folder_of(files, root)
    (entry,) = [key for key in files if key.startswith(f"{root}/history/")]
    assert sorted(files) == sorted(
        [
            f"{root}/{POINTER}",
            f"{root}/{folder}/{MANIFEST}",
            f"{root}/{folder}/{REFERENCE}",
            *(f"{root}/{folder}/{f}" for f in BUNDLE),
            entry,
        ]
    ), "the lease lock is gone once register is done"
    assert json.loads(files[entry])["to"] == {
        "version": 1,
        "manifest_sha256": sha256(files[f"{root}/{folder}/{MANIFEST}"]),
    }
    assert_mirrored(files, root, 1, runs.good)
    register_run = client.search_runs(
        [client.get_experiment_by_name(EXPERIMENT).experiment_id],
        filter_string=f"tags.step = 'register' AND tags.registered_model = '{name}'",
    )[0]
    assert register_run.data.tags["registered_version"] == "1"
    assert register_run.data.tags["mirror.version"] == "1"

    again = cli("mirror", cfg)
    assert again.returncode == 0, again.stderr[-3000:]
    assert objects(bucket) == files, "a second mirror must change nothing"
    assert "already names" in again.stdout


def test_versions_register_the_logged_model_which_lists_them(model_cfg, runs: TrainRuns) -> None:
    """MLflow 3's `models:/m-<id>` source, and the logged model's `mlflow.modelVersions` tag, which the UI's
    logged-model page reads (through the REST API below) to link to its versions instead of "Not registered"."""
    cfg = model_cfg("registry.min_accuracy=0", "registry.min_behaviour_pass_rate=0", "registry.tolerance=1")
    name = cfg.registry.model_name
    assert run_register(model_cfg(*cfg_overrides(cfg), f"registry.run_id={runs.good}")).version == 1
    assert run_register(model_cfg(*cfg_overrides(cfg), f"registry.run_id={runs.good}")).version == 2
    client = MlflowClient(cfg.tracking.uri)
    model_id = client.get_run(runs.good).outputs.model_outputs[-1].model_id
    for number in ("1", "2"):
        version = client.get_model_version(name, number)
        assert (version.source, version.run_id) == (f"models:/{model_id}", runs.good)
    page = requests.get(f"{cfg.tracking.uri}/ajax-api/2.0/mlflow/logged-models/{model_id}", timeout=10)
    page.raise_for_status()
    tags = {tag["key"]: tag["value"] for tag in page.json()["model"]["info"]["tags"]}
    listed = json.loads(tags["mlflow.modelVersions"])
    assert [str(entry["version"]) for entry in listed if entry["name"] == name] == ["1", "2"]
    found = client.search_model_versions(f"name = '{name}'")
    assert sorted(v.version for v in found if v.source == f"models:/{model_id}") == ["1", "2"]


def cfg_overrides(cfg: Settings) -> list[str]:
    """The gate settings of ``cfg`` as overrides."""
    r = cfg.registry
    return [
        f"registry.min_accuracy={r.min_accuracy}",
        f"registry.min_behaviour_pass_rate={r.min_behaviour_pass_rate}",
        f"registry.tolerance={r.tolerance}",
    ]


def test_a_candidate_from_another_test_set_becomes_challenger(
    model_cfg, runs: TrainRuns, other_test_set_run: str, bucket: str
) -> None:
    """With a tolerance that lets any accuracy through, only the test set identity keeps the candidate out."""
    gate_open = ["registry.min_accuracy=0", "registry.min_behaviour_pass_rate=0", "registry.tolerance=1"]
    assert run_register(model_cfg(*gate_open, f"registry.run_id={runs.good}")).promoted
    before = objects(bucket)
    outcome = run_register(model_cfg(*gate_open, f"registry.run_id={other_test_set_run}"))
    client = MlflowClient(model_cfg().tracking.uri)
    good, other = (client.get_run(run).data.tags for run in (runs.good, other_test_set_run))
    assert (outcome.version, outcome.alias) == (2, CHALLENGER)
    assert outcome.reason == (
        "rejected by the production gate: not comparable: it was evaluated on test set sha256 "
        f"{good['dataset.test.sha256'][:12]}, 100 rows (rows sha256 {other[TEST_ROWS_TAG][:12]}), champion v1 on "
        f"test set sha256 {good['dataset.test.sha256'][:12]}, 200 rows (rows sha256 {good[TEST_ROWS_TAG][:12]})"
    )
    name = model_cfg().registry.model_name
    assert aliases(client, name) == {CHAMPION: 1, CHALLENGER: 2}
    assert client.get_model_version(name, "2").tags["gate"] == outcome.reason
    assert objects(bucket) == before


def test_a_champion_without_a_test_set_identity_is_not_comparable(model_cfg, runs: TrainRuns) -> None:
    """A champion registered before versions carried the test set (its tags removed here) cannot be beaten by
    numbers; the candidate waits as @challenger until promoted with registry.version."""
    gate_open = ["registry.min_accuracy=0", "registry.min_behaviour_pass_rate=0", "registry.tolerance=1"]
    name = model_cfg().registry.model_name
    assert run_register(model_cfg(*gate_open, f"registry.run_id={runs.worse}")).promoted
    client = MlflowClient(model_cfg().tracking.uri)
    for tag in ("dataset.test.sha256", "dataset.test.rows"):
        client.delete_model_version_tag(name, "1", tag)
    outcome = run_register(model_cfg(*gate_open, f"registry.run_id={runs.good}"))
    assert (outcome.version, outcome.alias) == (2, CHALLENGER)
    assert "not comparable: champion v1 has no test set identity" in outcome.reason
    promoted = run_register(model_cfg("registry.version=2"))
    assert promoted.promoted and aliases(client, name) == {CHAMPION: 2, PREVIOUS: 1}
    assert client.get_model_version(name, "2").tags[PROMOTED_BY] == "manual"


def test_worse_run_becomes_challenger_and_champion_stays(model_cfg, runs: TrainRuns, bucket: str) -> None:
    cfg = model_cfg("registry.min_accuracy=0", "registry.min_behaviour_pass_rate=0", "registry.tolerance=0")
    assert accuracy(cfg, runs.good) > accuracy(cfg, runs.worse), "the tiny model learned nothing in 2 epochs"
    assert run_register(
        model_cfg("registry.min_accuracy=0", "registry.min_behaviour_pass_rate=0", f"registry.run_id={runs.good}")
    ).promoted
    before = objects(bucket)

    result = cli("register", cfg, f"registry.run_id={runs.worse}")
    assert result.returncode == 0, result.stderr[-3000:]
    name = cfg.registry.model_name
    assert f"{name} v2 is @challenger: rejected by the production gate: test accuracy" in result.stdout
    assert "below champion v1's" in result.stdout
    client = MlflowClient(cfg.tracking.uri)
    assert aliases(client, name) == {CHAMPION: 1, CHALLENGER: 2}
    assert client.get_model_version(name, "2").tags["gate"].startswith("rejected by the production gate: test accuracy")
    assert objects(bucket) == before, "a rejected candidate must not touch storage"


def test_mirror_follows_champion_moved_by_hand(model_cfg, runs: TrainRuns, bucket: str) -> None:
    cfg = model_cfg("registry.min_accuracy=0", "registry.min_behaviour_pass_rate=0", "registry.tolerance=0")
    name, root = cfg.registry.model_name, f"models/{cfg.registry.model_name}"
    run_register(
        model_cfg("registry.min_accuracy=0", "registry.min_behaviour_pass_rate=0", f"registry.run_id={runs.good}")
    )
    assert not run_register(model_cfg("registry.min_accuracy=0.99", f"registry.run_id={runs.worse}")).promoted
    assert json.loads(objects(bucket)[f"{root}/{POINTER}"])["version"] == 1

    client = MlflowClient(cfg.tracking.uri)
    client.set_registered_model_alias(name, CHAMPION, 2)  # what the UI does
    moved = run_mirror(cfg)
    assert moved.version == 2 and moved.changed
    assert moved.recorded == "@champion was moved to v2 outside the pipeline; v1 is now @previous"
    assert aliases(client, name) == {CHAMPION: 2, PREVIOUS: 1}, "the challenger alias goes with the promotion"
    assert client.get_model_version(name, "2").tags[PROMOTED_BY] == "manual"
    assert client.get_model_version(name, "2").tags["gate"].startswith("rejected"), "the verdict at registration"
    assert_mirrored(objects(bucket), root, 2, runs.worse)
    again = run_mirror(cfg)
    assert not again.changed and again.recorded is None

    client.set_registered_model_alias(name, CHAMPION, 1)
    files_v1 = {k: v for k, v in objects(bucket).items() if "/v1-" in k}
    assert run_mirror(cfg).version == 1
    after = objects(bucket)
    assert_mirrored(after, root, 1, runs.good)
    assert {k: v for k, v in after.items() if "/v1-" in k} == files_v1
    assert aliases(client, name) == {CHAMPION: 1, PREVIOUS: 2}
    back = run_register(model_cfg("registry.rollback=true"))
    assert back.version == 2 and aliases(client, name) == {CHAMPION: 2, PREVIOUS: 1}


def test_two_registers_in_a_row_rollback_and_version(model_cfg, runs: TrainRuns, bucket: str) -> None:
    cfg = model_cfg("registry.min_accuracy=0", "registry.min_behaviour_pass_rate=0")
    name, root = cfg.registry.model_name, f"models/{cfg.registry.model_name}"
    client = MlflowClient(cfg.tracking.uri)
    assert run_register(cfg).version == 1
    with pytest.raises(RegistryError, match=f"model '{name}' has no @previous version to roll back to"):
        run_register(model_cfg("registry.rollback=true"))
    assert aliases(client, name) == {CHAMPION: 1}

    assert run_register(cfg).version == 2
    assert aliases(client, name) == {CHAMPION: 2, PREVIOUS: 1}
    assert [v for v in (1, 2) if CHAMPION in client.get_model_version(name, v).aliases] == [2]
    assert json.loads(objects(bucket)[f"{root}/{POINTER}"])["version"] == 2

    back = run_register(model_cfg("registry.rollback=true"))
    assert (back.version, back.alias) == (1, CHAMPION) and "rolled back to v1" in back.reason
    assert aliases(client, name) == {CHAMPION: 1, PREVIOUS: 2}
    assert_mirrored(objects(bucket), root, 1, runs.good)

    forward = run_register(model_cfg("registry.version=2"))
    assert forward.version == 2 and aliases(client, name) == {CHAMPION: 2, PREVIOUS: 1}
    assert json.loads(objects(bucket)[f"{root}/{POINTER}"])["version"] == 2


def test_bad_runs_versions_and_options_register_nothing(model_cfg, runs: TrainRuns, bucket: str) -> None:
    name = model_cfg().registry.model_name
    with pytest.raises(RegistryError, match="no run 'f00d' in the tracking store"):
        run_register(model_cfg("registry.run_id=f00d"))
    with pytest.raises(RegistryError, match=f"run {runs.upload} \\(upload run\\) logged no model 'model'"):
        run_register(model_cfg(f"registry.run_id={runs.upload}"))
    with pytest.raises(RegistryError, match=f"model '{name}' has no version 7"):
        run_register(model_cfg("registry.version=7"))
    with pytest.raises(ConfigError, match="exclusive"):
        run_register(model_cfg("registry.version=1", "registry.rollback=true"))
    with pytest.raises(RegistryError, match=f"model '{name}' has no @champion: run the register step first"):
        run_mirror(model_cfg())
    assert not MlflowClient(model_cfg().tracking.uri).search_model_versions(f"name = '{name}'")
    assert objects(bucket) == {}


def test_tracking_server_down_fails_in_one_line(model_cfg) -> None:
    cfg = model_cfg(f"tracking.uri=http://127.0.0.1:{free_port()}")
    result = cli("register", cfg)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: no MLflow tracking server at http://127.0.0.1")
    assert "Traceback" not in result.stderr


# Local SQLite tracking, no server: one quick training run, registered under a model name per test.


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A local SQLite store and local dataset storage holding one quick train run; returns (root, run id)."""
    root = tmp_path_factory.mktemp("local")
    cfg = local_cfg(root, None)
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        with step_run(cfg, "upload"):
            upload_and_log(cfg)
        with step_run(cfg, "train") as run:
            train(cfg)
    return root, run.info.run_id


def local_cfg(root: Path, name: str | None, *overrides: str) -> Settings:
    return compose(
        [
            f"tracking.uri=sqlite:///{root / 'mlflow' / 'mlflow.db'}",
            f"storage.uri={root / 'store'}",
            f"train.output_dir={root / 'checkpoints'}",
            f"data.source={require_agnews()}",
            "registry.min_accuracy=0",
            "registry.min_behaviour_pass_rate=0",
            *QUICK,
            *([f"registry.model_name={name}"] if name else []),
            *overrides,
        ]
    )


def test_local_sqlite_register_and_mirror(local: tuple[Path, str]) -> None:
    root, run_id = local
    cfg = local_cfg(root, "local-model")
    outcome = run_register(cfg)
    assert (outcome.version, outcome.alias) == (1, CHAMPION)
    assert mlflow.get_tracking_uri().startswith("sqlite:///")
    assert MlflowClient().get_model_version("local-model", "1").run_id == run_id
    model_id = MlflowClient().get_run(run_id).outputs.model_outputs[-1].model_id
    listed = json.loads(MlflowClient().get_logged_model(model_id).tags["mlflow.modelVersions"])
    assert {"name": "local-model", "version": 1} in listed, "no server to link them: register does"
    store = root / "store"
    files = {p.relative_to(store).as_posix(): p.read_bytes() for p in (store / "models").rglob("*") if p.is_file()}
    assert_mirrored(files, "models/local-model", 1, run_id)


def test_a_register_that_fails_on_a_fresh_local_store_leaves_no_folder(local: tuple[Path, str]) -> None:
    root, _ = local
    with pytest.raises(RegistryError, match="no run 'f00d' in the tracking store"):
        run_register(local_cfg(root, "fresh-model", "registry.run_id=f00d"))
    assert not (root / "store" / "models" / "fresh-model").exists(), "the lease's folder stayed behind"


def test_mirror_failing_half_way_keeps_the_old_pointer(
    local: tuple[Path, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, run_id = local
    cfg = local_cfg(root, "half-way")
    assert run_register(cfg).version == 1
    storage = open_storage(cfg.storage)
    pointer = storage.read_bytes(f"models/half-way/{POINTER}")
    v1 = folder_of({f"models/half-way/{POINTER}": pointer}, "models/half-way")
    write = LocalStorage.write_bytes

    def disk_full_at_the_last_file(self: LocalStorage, key: str, data: bytes) -> None:
        if key.startswith("models/half-way/v2-") and key.endswith("/tokenizer.json"):
            raise StorageError(f"cannot write {self.root / key}: No space left on device")
        write(self, key, data)

    monkeypatch.setattr(LocalStorage, "write_bytes", disk_full_at_the_last_file)
    with pytest.raises(StorageError) as failure:
        run_register(cfg)
    message = str(failure.value)
    assert message.startswith("half-way v2 is @champion, but mirroring it failed: cannot write")
    assert "tokenizer.json" in message and "python -m steps.mirror" in message
    assert storage.read_bytes(f"models/half-way/{POINTER}") == pointer
    (v2,) = [p.name for p in (root / "store" / "models" / "half-way").glob("v2-*")]
    assert storage.exists(f"models/half-way/{v2}/model.int8.onnx")  # half-way indeed
    assert not storage.exists(f"models/half-way/{v2}/{MANIFEST}")
    files = {key: storage.read_bytes(key) for key in storage.list(f"models/half-way/{v1}")}
    assert_mirrored(files | {f"models/half-way/{POINTER}": pointer}, "models/half-way", 1, run_id)

    monkeypatch.setattr(LocalStorage, "write_bytes", write)
    assert run_mirror(cfg).version == 2
    files = {key: storage.read_bytes(key) for key in storage.list("models/half-way")}
    assert_mirrored(files, "models/half-way", 2, run_id)
    assert folder_of(files, "models/half-way") == v2, "the mirror completes the same folder"


def test_bucket_not_writable_leaves_registry_and_storage_untouched(
    local: tuple[Path, str], bucket: str, iam_enforced: dict[str, tuple[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The model's lease lives in the bucket: a bucket that this role cannot write fails before the registry
    changes, so the registry never gets ahead of storage."""
    root, _ = local
    cfg = local_cfg(root, "read-only", f"storage.uri=s3://{bucket}")
    use_credentials(monkeypatch, *iam_enforced["reader"])
    with pytest.raises(StorageError, match=r"cannot write s3://.*/models/read-only/\.lock: access denied"):
        run_register(cfg)
    use_credentials(monkeypatch, *iam_enforced["writer"])
    assert objects(bucket) == {}
    assert aliases(MlflowClient(cfg.tracking.uri), "read-only") == {}
