"""Rollouts: a candidate in champion.json (its strict parsing), and the rollout step's start, promote and abort
against a real MLflow store and storage, each recorded in the history; a step stopped half-way is finished or undone
by the next, and two rollouts can't run at once.

One tiny training run (a local SQLite store) is registered under each test's own model name, as v1 (@champion) and
v2, so that no test trains.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from mlflow import MlflowClient

from agnews.config import PROJECT_ROOT, compose
from agnews.errors import RolloutError
from agnews.names import CANDIDATE, CHALLENGER, CHAMPION, PREVIOUS, PROMOTED_BY, ROLLOUT_MODE_TAG
from agnews.promotion import rollout
from agnews.promotion.mirror import ModelStore, model_lease, promotion_history, read_pointer, reconcile
from agnews.promotion.register import register
from agnews.promotion.registry import aliases, make_candidate, promote
from agnews.settings import Settings
from agnews.tracking import connect, step_run
from bundle.layout import MANIFEST, ContractError, parse_manifest, parse_pointer, pointer_bytes, sha256
from tests.conftest import upload_and_train
from tests.helpers import run_step

pytestmark = pytest.mark.promotion  # make test-promotion

SHA = "a" * 64


# ---- the contract: champion.json's candidate -------------------------------------------------------------------


def pointer_doc(**candidate: object) -> bytes:
    doc = json.loads(pointer_bytes("m", 1, b"{}", "2026-01-01T00:00:00+00:00"))
    if candidate:
        doc["candidate"] = {"version": 2, "manifest": f"v2-{SHA[:12]}/manifest.json", "manifest_sha256": SHA}
        doc["candidate"] |= {"mode": "canary", "weight": 0.1, "rollout": "r1"} | candidate
    return json.dumps(doc).encode()


def test_a_pointer_without_a_candidate_reads_as_before() -> None:
    pointer = parse_pointer(pointer_doc())
    assert (pointer.version, pointer.candidate, pointer.refused) == (1, None, None)


def test_a_candidate_is_parsed_strictly() -> None:
    pointer = parse_pointer(pointer_doc(weight=0.25))
    assert pointer.candidate is not None and pointer.refused is None
    assert (pointer.candidate.version, pointer.candidate.mode, pointer.candidate.weight) == (2, "canary", 0.25)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"mode": "blue-green"}, "'mode' 'blue-green' is not one of shadow, canary"),
        ({"weight": 1.5}, "'weight' 1.5 is not in [0, 1]"),
        ({"weight": True}, "'weight' must not be a boolean"),
        ({"ramp": [0.1, 0.5]}, "has fields this reader does not know: ramp"),
        ({"manifest": "../v2/manifest.json"}, "is not a plain file name"),
        ({"rollout": "../x"}, "is not a plain file name"),
        ({"version": 0}, "is not a version number"),
    ],
)
def test_a_candidate_this_reader_does_not_understand_is_refused_and_the_champion_kept(
    change: dict, message: str
) -> None:
    pointer = parse_pointer(pointer_doc(**change))
    assert pointer.candidate is None and pointer.version == 1
    assert pointer.refused is not None and message in pointer.refused, pointer.refused


def test_a_broken_champion_is_still_refused_whatever_the_candidate() -> None:
    doc = json.loads(pointer_doc(weight=0.2))
    doc["manifest_sha256"] = "abc"
    with pytest.raises(ContractError, match="'manifest_sha256' is not a sha256"):
        parse_pointer(json.dumps(doc).encode())


# ---- the rollout step against a real store ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """One tiny training run in a local SQLite store: the overrides that reach it."""
    return upload_and_train(tmp_path_factory.mktemp("rollout"), "preset=test", "registry=open", "storage.lease_s=10")


@pytest.fixture
def configure(trained: list[str], tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    """Settings for this test: its own model name and store; v1 and v2 of that model registered, v1 @champion."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("S3_BUCKET", raising=False)
    base = [*trained, f"registry.model_name={request.node.name[:60].replace('_', '-')}"]
    store = f"storage.uri={tmp_path / 'store'}"

    def make(*overrides: str) -> Settings:
        return compose([*base, store, *overrides])

    cfg = make()
    with step_run(cfg, "register"):
        register(cfg.registry, cfg.storage, cfg.tracking.experiment)
    closed = make("registry.min_accuracy=1")
    with step_run(closed, "register"):  # the same run again, through a gate no model passes: v2 @challenger
        register(closed.registry, closed.storage, closed.tracking.experiment)
    assert aliases(MlflowClient(), cfg.registry.model_name) == {CHAMPION: 1, CHALLENGER: 2}
    return make


def reconcile_storage(cfg: Settings) -> None:
    """What the next step, or the receiver's timer, does first."""
    connect(cfg.tracking)
    model = ModelStore.open(cfg.registry, cfg.storage)
    with model_lease(model, cfg.storage, "test") as (lease, client):
        reconcile(model, lease, client, "timer")


def served(cfg: Settings) -> dict:
    """champion.json as stored."""
    model = ModelStore.open(cfg.registry, cfg.storage)
    return json.loads(model.storage.read_bytes(model.pointer))


def history(cfg: Settings) -> list[tuple[int, int | None, str, str]]:
    """(champion, candidate, how, via) of each history entry, oldest first."""
    return [
        (entry.to.version, entry.candidate.version if entry.candidate else None, entry.how, entry.via)
        for entry in reversed(promotion_history(cfg.registry, cfg.storage))
    ]


def test_start_serves_a_canary_beside_the_champion(configure: Callable[..., Settings]) -> None:
    cfg = configure()
    before = len(history(cfg))
    rollout.start(cfg.registry, cfg.storage, 2, "canary", 0.1)
    assert aliases(MlflowClient(), cfg.registry.model_name) == {CHAMPION: 1, CHALLENGER: 2, CANDIDATE: 2}
    doc = served(cfg)
    assert doc["version"] == 1
    candidate = doc["candidate"]
    assert (candidate["version"], candidate["mode"], candidate["weight"]) == (2, "canary", 0.1)
    model = ModelStore.open(cfg.registry, cfg.storage)
    manifest = model.storage.read_bytes(f"{model.root}/{candidate['manifest']}")
    assert sha256(manifest) == candidate["manifest_sha256"]
    for name, digest in parse_manifest(manifest).files.items():  # the candidate's bundle, complete and verified
        assert sha256(model.storage.read_bytes(f"{model.root}/{candidate['manifest'].split('/')[0]}/{name}")) == digest
    assert history(cfg)[before:] == [(1, 2, "canary", "rollout")]
    status = str(rollout.status(cfg.registry, cfg.storage))
    assert "@candidate v2 in canary mode answering 10% of the texts" in status
    assert "storage serves v1 with candidate v2 (canary)" in status


def test_a_second_rollout_is_refused_while_one_is_under_way(configure: Callable[..., Settings]) -> None:
    cfg = configure()
    rollout.start(cfg.registry, cfg.storage, 2, "shadow", 0.1)
    with pytest.raises(RolloutError, match=r"a rollout of \S+ v2 is under way: promote or abort it first"):
        rollout.start(cfg.registry, cfg.storage, 2, "canary", 0.5)
    assert served(cfg)["candidate"]["mode"] == "shadow"


def test_two_starts_at_once_end_with_one_rollout(configure: Callable[..., Settings]) -> None:
    cfg = configure()
    outcomes: list[str] = []

    def start(mode: str) -> None:
        try:
            rollout.start(cfg.registry, cfg.storage, 2, mode, 0.2)
            outcomes.append(mode)
        except RolloutError as exc:
            outcomes.append(str(exc))

    threads = [threading.Thread(target=start, args=(mode,)) for mode in ("shadow", "canary")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    started = [o for o in outcomes if o in ("shadow", "canary")]
    assert len(started) == 1 and len(outcomes) == 2, outcomes
    assert served(cfg)["candidate"]["mode"] == started[0]
    assert [h for h in history(cfg) if h[2] in ("shadow", "canary")] == [(1, 2, started[0], "rollout")]


def test_promote_makes_the_candidate_champion_and_serves_it_alone(configure: Callable[..., Settings]) -> None:
    cfg = configure()
    rollout.start(cfg.registry, cfg.storage, 2, "canary", 0.1)
    rollout.promote_candidate(cfg.registry, cfg.storage)
    client = MlflowClient()
    assert aliases(client, cfg.registry.model_name) == {CHAMPION: 2, PREVIOUS: 1}
    assert client.get_model_version(cfg.registry.model_name, "2").tags[PROMOTED_BY] == "rollout"
    doc = served(cfg)
    assert doc["version"] == 2 and "candidate" not in doc
    assert history(cfg)[-2:] == [(1, 2, "canary", "rollout"), (2, None, "promote", "rollout")]
    with pytest.raises(RolloutError, match=r"no rollout of .* is under way"):
        rollout.abort(cfg.registry, cfg.storage)


def test_abort_drops_the_candidate_and_the_champion_serves_on(configure: Callable[..., Settings]) -> None:
    cfg = configure()
    rollout.start(cfg.registry, cfg.storage, 2, "shadow", 0.1)
    rollout.abort(cfg.registry, cfg.storage)
    assert aliases(MlflowClient(), cfg.registry.model_name).get(CANDIDATE) is None
    doc = served(cfg)
    assert doc["version"] == 1 and "candidate" not in doc
    assert history(cfg)[-2:] == [(1, 2, "shadow", "rollout"), (1, None, "abort", "rollout")]


def test_register_with_a_rollout_makes_a_passing_model_the_candidate(configure: Callable[..., Settings]) -> None:
    cfg = configure("registry.rollout=canary", "registry.rollout_weight=0.3")
    with step_run(cfg, "register"):
        verdict = register(cfg.registry, cfg.storage, cfg.tracking.experiment)
    assert (verdict.version, verdict.alias) == (3, CANDIDATE)
    assert aliases(MlflowClient(), cfg.registry.model_name)[CHAMPION] == 1
    candidate = served(cfg)["candidate"]
    assert (candidate["version"], candidate["mode"], candidate["weight"]) == (3, "canary", 0.3)
    with step_run(cfg, "register"), pytest.raises(RolloutError, match="v3 is under way"):
        register(cfg.registry, cfg.storage, cfg.tracking.experiment)
    assert len(MlflowClient().search_model_versions(f"name = '{cfg.registry.model_name}'")) == 3


# A step stopped half-way (its process killed between two writes): the registry's aliases are the record, and the
# next step, or the receiver's reconcile, brings champion.json in line with them.


def test_a_start_stopped_before_its_mirror_is_finished_by_the_reconcile(configure: Callable[..., Settings]) -> None:
    cfg = configure()
    make_candidate(MlflowClient(), cfg.registry.model_name, 2, "canary", 0.1)  # the alias moved, then the kill
    assert "candidate" not in served(cfg)
    reconcile_storage(cfg)
    assert served(cfg)["candidate"]["version"] == 2
    assert history(cfg)[-1] == (1, 2, "canary", "timer")


def test_a_promote_stopped_between_its_alias_moves_is_finished_by_the_reconcile(
    configure: Callable[..., Settings],
) -> None:
    cfg = configure()
    rollout.start(cfg.registry, cfg.storage, 2, "canary", 0.1)
    promote(MlflowClient(), cfg.registry.model_name, 2, "rollout")  # @champion moved, @candidate still on v2
    reconcile_storage(cfg)
    assert aliases(MlflowClient(), cfg.registry.model_name) == {CHAMPION: 2, PREVIOUS: 1}
    doc = served(cfg)
    assert doc["version"] == 2 and "candidate" not in doc
    assert history(cfg)[-1] == (2, None, "promote", "timer")


def test_an_abort_stopped_before_its_mirror_is_finished_by_the_reconcile(configure: Callable[..., Settings]) -> None:
    cfg = configure()
    rollout.start(cfg.registry, cfg.storage, 2, "shadow", 0.1)
    MlflowClient().delete_registered_model_alias(cfg.registry.model_name, CANDIDATE)
    reconcile_storage(cfg)
    assert "candidate" not in served(cfg)
    assert history(cfg)[-1] == (1, None, "abort", "timer")


def test_a_candidate_set_in_the_ui_is_served_as_a_shadow(configure: Callable[..., Settings]) -> None:
    cfg = configure()
    client = MlflowClient()
    client.set_registered_model_alias(cfg.registry.model_name, CANDIDATE, "2")
    assert ROLLOUT_MODE_TAG not in client.get_model_version(cfg.registry.model_name, "2").tags
    reconcile_storage(cfg)
    candidate = served(cfg)["candidate"]
    assert (candidate["version"], candidate["mode"], candidate["weight"]) == (2, "shadow", 0.0)


def test_champion_json_stays_valid_through_a_rollout(configure: Callable[..., Settings]) -> None:
    cfg = configure()
    model = ModelStore.open(cfg.registry, cfg.storage)
    for step in (
        lambda: rollout.start(cfg.registry, cfg.storage, 2, "canary", 0.5),
        lambda: rollout.abort(cfg.registry, cfg.storage),
        lambda: rollout.start(cfg.registry, cfg.storage, 2, "shadow", 0.5),
        lambda: rollout.promote_candidate(cfg.registry, cfg.storage),
    ):
        step()
        pointer = read_pointer(model.storage, model.pointer)
        assert pointer is not None and pointer.refused is None
        manifest = model.storage.read_bytes(f"{model.root}/{pointer.manifest}")
        assert sha256(manifest) == pointer.manifest_sha256 and MANIFEST in pointer.manifest
    assert [h[2] for h in history(cfg)][-4:] == ["canary", "abort", "shadow", "promote"]


def test_the_rollout_command_prints_one_line_per_step(configure: Callable[..., Settings]) -> None:
    cfg = configure()
    common = [
        f"tracking.uri={cfg.tracking.uri}",
        f"storage.uri={cfg.storage.uri}",
        f"registry.model_name={cfg.registry.model_name}",
    ]
    started = run_step("rollout", "start", "--version", "2", "--mode", "canary", "--weight", "0.25", *common)
    assert started.returncode == 0, started.stderr[-2000:]
    assert "start: " in started.stdout and "@candidate v2 in canary mode answering 25% of the texts" in started.stdout
    again = run_step("rollout", "start", "--version", "2", "--mode", "shadow", *common)
    assert again.returncode == 1 and again.stderr.strip().splitlines()[-1].startswith("error: a rollout of")
    status = run_step("rollout", "status", *common)
    assert status.returncode == 0 and "storage serves v1 with candidate v2 (canary)" in status.stdout
    shown = run_step("history", *common)
    assert "how: canary" in shown.stdout and "candidate: v2" in shown.stdout


# Killed and racing processes, as the promotion tests run them.

# `python -m steps.rollout` with a registry function wrapped so that the process kills itself (SIGKILL) once
# @candidate has moved, before anything is mirrored.
KILLED_AFTER_THE_ALIAS = """
import os, signal, sys
from agnews.promotion import registry, rollout
from steps.rollout import main
real = registry.make_candidate
def killed(*args, **kwargs):
    real(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGKILL)
rollout.make_candidate = killed
sys.argv[0] = "steps.rollout"
main()
"""


def settings_args(cfg: Settings) -> list[str]:
    return [
        f"tracking.uri={cfg.tracking.uri}",
        f"storage.uri={cfg.storage.uri}",
        f"registry.model_name={cfg.registry.model_name}",
        "registry=open",
        "storage.lease_s=10",
    ]


def test_a_start_killed_after_its_alias_leaves_champion_json_valid_and_the_next_step_finishes_it(
    configure: Callable[..., Settings],
) -> None:
    cfg = configure()
    killed = subprocess.run(
        [
            sys.executable,
            "-c",
            KILLED_AFTER_THE_ALIAS,
            "start",
            "--version",
            "2",
            "--mode",
            "canary",
            *settings_args(cfg),
        ],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert aliases(MlflowClient(), cfg.registry.model_name).get(CANDIDATE) == 2
    doc = served(cfg)
    assert doc["version"] == 1 and "candidate" not in doc  # valid, and as before the start
    status = run_step("rollout", "status", *settings_args(cfg))
    assert "@candidate v2 in canary mode" in status.stdout and status.stdout.rstrip().endswith("storage serves v1")
    done = run_step("mirror", *settings_args(cfg))  # the next step reconciles first
    assert done.returncode == 0, done.stderr[-2000:]
    assert served(cfg)["candidate"]["version"] == 2
    assert history(cfg)[-1] == (1, 2, "canary", "mirror")


def test_a_promote_racing_a_register_ends_as_if_one_ran_after_the_other(configure: Callable[..., Settings]) -> None:
    cfg = configure()
    rollout.start(cfg.registry, cfg.storage, 2, "canary", 0.1)
    args = settings_args(cfg)
    racing = [
        subprocess.Popen(
            [sys.executable, "-m", f"steps.{step}", *extra, *args],
            cwd=PROJECT_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for step, extra in (("rollout", ["promote"]), ("register", []))
    ]
    outputs = [process.communicate(timeout=600) for process in racing]
    assert [process.returncode for process in racing] == [0, 0], [err[-2000:] for _, err in outputs]
    found = aliases(MlflowClient(), cfg.registry.model_name)
    # promote then register: v3 passes the open gate over v2; register then promote: v2 over v3
    assert found in ({CHAMPION: 3, PREVIOUS: 2, CHALLENGER: 2}, {CHAMPION: 3, PREVIOUS: 2}, {CHAMPION: 2, PREVIOUS: 3})
    doc = served(cfg)
    assert doc["version"] == found[CHAMPION] and "candidate" not in doc
    moves = [(champion, how) for champion, _, how, _ in history(cfg)][-2:]
    assert moves in ([(2, "promote"), (3, "gate")], [(3, "gate"), (2, "promote")])
