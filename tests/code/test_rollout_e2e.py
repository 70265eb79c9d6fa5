"""A rollout end to end, as a user runs it, through the command lines alone: real AG News uploaded, two MiniLM models
trained (another seed each) and registered, the second as a shadow @candidate; lambda/local.py serving the store to
AG News test texts; ``python -m steps.monitor monitor.rollout.act=true`` promoting the good candidate; then a model
trained on shuffled labels, which still passes the open gate, registered as a shadow, served beside the new champion,
and aborted by the monitor; ``python -m steps.history`` showing each step.

A local SQLite tracking store and a storage folder, both in the test's tmp folder. The models are MiniLM fine-tuned
on 2,000 rows for one epoch, each tested on the whole test split: the test set identity that the gate compares is then
the same whatever the seed (``data.test_size`` would draw its rows by the seed).
"""

from __future__ import annotations

import csv
import json
import re
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from agnews.names import CANDIDATE, CHAMPION, PREVIOUS
from agnews.promotion.registry import aliases
from bundle.layout import POINTER
from tests.code.test_rollout_serving import ask_each, texts
from tests.helpers import MODEL_NAME, LocalServer, lambda_process, require_agnews, run_step

pytestmark = pytest.mark.slow  # three real trainings: 6 to 7 minutes on a 2-core CPU

# The tiny models of the other tests learn little. MiniLM on 2,000 rows for one epoch learns AG News (test accuracy
# about 0.88), and two seeds of it agree on about 97% of the texts with like confidence, as a good candidate and its
# champion should; on 1,000 rows its answers are mostly below monitor.low_confidence, and two seeds differ there.
TRAIN = ("model=minilm", "data.sample_size=2000", "data.val_size=500", "data.test_size=null", "train.epochs=1")
ASKED = 300  # texts asked in each serving phase: above monitor.rollout.min_answers (100) and monitor.min_answers
STEP_S = 1200  # one step's time limit: a training run on a busy 2-core CPU

# One line of `python -m steps.history`: the champion before and after, how, via, and the candidate served after.
ENTRY = re.compile(
    r"(?:nothing|v(?P<before>\d+) \(manifest \w+\)) -> v(?P<after>\d+) \(manifest \w+\)  how: (?P<how>\w+), "
    r"who: [^,]+(?:, via: (?P<via>\w+))?(?:, candidate: v(?P<candidate>\d+))?"
)


def shuffled_agnews(folder: Path, seed: int) -> Path:
    """A copy of AG News in ``folder``: train.csv with its label column shuffled (seeded), test.csv as it is."""
    source = require_agnews()
    folder.mkdir()
    with (source / "train.csv").open(newline="", encoding="utf-8") as file:
        rows = list(csv.reader(file))
    labels = np.random.default_rng(seed).permutation([row[0] for row in rows])
    with (folder / "train.csv").open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file, quoting=csv.QUOTE_ALL, lineterminator="\n")
        writer.writerows([label, *row[1:]] for label, row in zip(labels, rows, strict=True))
    (folder / "test.csv").write_bytes((source / "test.csv").read_bytes())
    return folder


def registered(printed: str, version: int, alias: str) -> float:
    """The test accuracy with which ``python -m steps.register`` says it made ``version`` ``alias``."""
    found = re.search(
        rf"{MODEL_NAME} v{version} is @{alias}: promoted by the open gate: test accuracy ([\d.]+) ", printed
    )
    assert found is not None, printed
    return float(found.group(1))


def step(name: str, *args: str) -> str:
    """``python -m steps.<name> args...``, which must exit 0; its stdout."""
    done = run_step(name, *args, timeout=STEP_S)
    assert done.returncode == 0, f"steps.{name} exited {done.returncode}:\n{done.stdout[-2000:]}{done.stderr[-3000:]}"
    return done.stdout


def serve(model_root: Path, tmp_path: Path, questions: list[str]) -> list[int]:
    """lambda/local.py on the store, asked each text in turn (each answer a 200): the version of each answer."""
    server = LocalServer(lambda_process(model_root, tmp_path) | {"MODEL_REFRESH_SECONDS": "0"})
    try:
        answers = ask_each(server, questions)
    finally:
        server.stop()
    return [answer["model_version"] for answer in answers]


def monitor(since: datetime, common: list[str]) -> str:
    """``python -m steps.monitor`` acting on the rollout, over the answers since ``since``: its rollout line."""
    printed = step("monitor", *common, f"monitor.since={since:%Y-%m-%dT%H:%M:%S}", "monitor.rollout.act=true")
    (line,) = [line for line in printed.splitlines() if line.startswith("monitor: ") and "; rollout v" in line]
    return line


def test_a_good_candidate_is_promoted_and_one_trained_on_shuffled_labels_is_aborted(tmp_path: Path) -> None:
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    store = tmp_path / "store"
    common = [f"tracking.uri={tracking}", f"storage.uri={store}"]
    train = [*common, *TRAIN, f"train.output_dir={tmp_path / 'checkpoints'}"]
    client = MlflowClient(tracking_uri=tracking, registry_uri=tracking)
    model_root = store / "models" / MODEL_NAME
    questions = texts(ASKED)

    def served() -> dict:
        return json.loads((model_root / POINTER).read_bytes())

    # 1. real AG News, v1 trained and registered through the open gate: @champion
    step("upload", *common, f"data.source={require_agnews()}")
    step("train", *train, "seed=1")
    assert registered(step("register", *common, "registry=open"), 1, CHAMPION) > 0.8  # well above chance (0.25)
    # 2. v2, another seed, registered as a shadow: @candidate
    step("train", *train, "seed=2")
    assert registered(step("register", *common, "registry=open", "registry.rollout=shadow"), 2, CANDIDATE) > 0.8
    assert aliases(client, MODEL_NAME) == {CHAMPION: 1, CANDIDATE: 2}
    assert (served()["version"], served()["candidate"]["version"], served()["candidate"]["mode"]) == (1, 2, "shadow")
    rollout = served()["candidate"]["rollout"]

    # 3. served: the champion answers every text, the shadow none
    since = datetime.now(UTC)
    assert serve(model_root, tmp_path, questions) == [1] * ASKED

    # 4. the monitor judges the shadow against the champion on that traffic, and promotes it
    line = monitor(since, common)
    assert f"rollout v2 (shadow, rollout {rollout}) against @{CHAMPION} v1: promote: agreement " in line, line
    assert f"promoted v2 to @{CHAMPION}" in line, line
    assert aliases(client, MODEL_NAME) == {CHAMPION: 2, PREVIOUS: 1}
    assert served()["version"] == 2 and "candidate" not in served()

    # 5. v3 trained on shuffled labels (the test split as it is): it passes the open gate, and becomes a shadow
    shuffled = shuffled_agnews(tmp_path / "shuffled", seed=3)
    step("upload", *common, f"data.source={shuffled}")
    step("train", *train, "seed=3")
    assert registered(step("register", *common, "registry=open", "registry.rollout=shadow"), 3, CANDIDATE) < 0.4
    assert (served()["version"], served()["candidate"]["version"]) == (2, 3)
    rollout = served()["candidate"]["rollout"]

    # 6. served: the champion answers throughout; the monitor finds the shadow disagreeing with it, and aborts
    since = datetime.now(UTC)
    assert serve(model_root, tmp_path, questions) == [2] * ASKED
    line = monitor(since, common)
    judged = re.search(
        rf"rollout v3 \(shadow, rollout {rollout}\) against @{CHAMPION} v2: abort: agreement ([\d.]+) \(at least 0.9\)",
        line,
    )
    assert judged is not None and float(judged.group(1)) < 0.9, line
    assert f"aborted the rollout: @{CHAMPION} v2 serves alone" in line, line
    assert aliases(client, MODEL_NAME) == {CHAMPION: 2, PREVIOUS: 1}
    assert served()["version"] == 2 and "candidate" not in served()
    assert serve(model_root, tmp_path, questions[:20]) == [2] * 20

    # 7. the history, oldest first: each step, and what made it
    entries = [ENTRY.search(line) for line in reversed(step("history", *common).splitlines())]
    assert all(entries), entries
    moves = [(e["before"], e["after"], e["how"], e["via"], e["candidate"]) for e in entries if e is not None]
    assert moves == [
        (None, "1", "gate", "register", None),
        ("1", "1", "shadow", "register", "2"),
        ("1", "2", "promote", "monitor", None),
        ("2", "2", "shadow", "register", "3"),
        ("2", "2", "abort", "monitor", None),
    ]
