"""The monitor judges a rollout: the candidate against the champion on one window's captured answers (a shadow's and
a canary's), with the verdicts wait, promote and abort, and, with monitor.rollout.act=true, carried out through the
rollout step's functions, as the registry, champion.json and the promotion history show.

A real local store and SQLite registry: test_rollout's fixtures train one tiny model per module and register it as
v1 (@champion) and v2 under each test's own model name. The capture lines are the ones the Lambda writes (the
champion's line, the candidate's entries marked with their version and, in shadow mode, as shadow), built from the
tiny model's own answers to the texts of its validation split (the reference's: traffic that does not drift), and
written into the store's captures/<model>/YYYY/MM/DD/HH/ layout.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from mlflow import MlflowClient

from agnews.config import compose
from agnews.errors import ConfigError
from agnews.monitoring.watch import Outcome, watch
from agnews.names import (
    ABORT,
    CANDIDATE,
    CHAMPION,
    PREVIOUS,
    PROMOTE,
    ROLLOUT_ACTED_TAG,
    ROLLOUT_VERDICT_TAG,
    ROLLOUT_WHY_TAG,
    WAIT,
)
from agnews.promotion import rollout
from agnews.promotion.mirror import ModelStore
from agnews.promotion.registry import aliases
from agnews.settings import Settings
from agnews.tracking import step_run
from bundle.capture import CAPTURES, by_model, entry, line_digest, object_prefix, text_sha256
from bundle.layout import REFERENCE
from bundle.predictor import Predictor
from tests.code import test_rollout
from tests.helpers import run_step

pytestmark = pytest.mark.promotion  # make test-promotion

# test_rollout's fixtures: the module's tiny model, and each test's model registered as v1 (@champion) and v2.
trained = test_rollout.trained
configure = test_rollout.configure
served, history = test_rollout.served, test_rollout.history

HOUR = datetime(2026, 1, 1, 10, tzinfo=UTC)  # the window's one hour; every answer at HOUR + 30 minutes
WINDOW = ["monitor.since=2026-01-01T10:00", "monitor.until=2026-01-01T11:00"]
TEXTS = 300  # texts answered in the window, one a request


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("monitor.rollout.min_answers=0", " is out of range: it must be > 0"),
        ("monitor.rollout.min_agreement=1.5", " is out of range: it must be in [0, 1]"),
        ("monitor.rollout.max_latency_ratio=0.5", " is out of range: it must be >= 1"),
        ("monitor.rollout.act=perhaps", ": Value 'perhaps' is not a valid bool"),
    ],
)
def test_rollout_settings_are_checked_at_composition(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(override + message)):
        compose([override])


# ---- the capture lines ----


def texts(cfg: Settings) -> list[str]:
    """TEXTS texts like the validation split's: its own (the reference's, mirrored beside v1's bundle), in turn."""
    reference = pd.read_parquet(bundle_folder(cfg) / REFERENCE)
    return list(itertools.islice(itertools.cycle(reference.text), TEXTS))


def bundle_folder(cfg: Settings) -> Path:
    """v1's folder in storage, as champion.json names it."""
    model = ModelStore.open(cfg.registry, cfg.storage)
    return Path(cfg.storage.uri) / model.root / served(cfg)["manifest"].split("/")[0]


def answer(predictor: Predictor, text: str) -> dict[str, Any]:
    """The line's entry for the tiny model's answer to ``text``."""
    (result,), (reading,) = predictor.predict_read([text])
    return entry(result, reading.tokens, reading.cut, text, keep_text=False)


def rotated(captured: dict[str, Any], labels: list[str]) -> dict[str, Any]:
    """The same entry with each probability moved to the next label: another class, as confident."""
    moved = {labels[(i + 1) % len(labels)]: captured["p"][label] for i, label in enumerate(labels)}
    return captured | {"class": labels[(labels.index(captured["class"]) + 1) % len(labels)], "p": moved}


class Captures:
    """Capture lines as the Lambda writes them while champion.json serves a candidate."""

    def __init__(self, cfg: Settings) -> None:
        doc = served(cfg)
        self.cfg = cfg
        self.manifest, self.candidate = doc["manifest_sha256"], doc["candidate"]
        self.predictor = Predictor(bundle_folder(cfg))
        self.lines: list[dict[str, Any]] = []

    def by_candidate(self, captured: dict[str, Any], shadow: bool) -> dict[str, Any]:
        return by_model(dict(captured), self.candidate["version"], self.candidate["manifest_sha256"], shadow)

    def request(self, number: int, entries: list[dict[str, Any]], ms: float = 12.0) -> None:
        self.lines.append(
            {
                "time": int((HOUR.timestamp() + 1800) * 1000),
                "request_id": f"request-{number}",
                "model": self.cfg.registry.model_name,
                "version": served(self.cfg)["version"],
                "manifest": line_digest(self.manifest),
                "ms": ms,
                CAPTURES: entries,
            }
        )

    def write(self) -> None:
        folder = Path(self.cfg.storage.uri) / object_prefix(self.cfg.registry.model_name, HOUR)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "captures-1").write_text("".join(json.dumps(line) + "\n" for line in self.lines))


def shadow_window(cfg: Settings, disagree: bool = False) -> Captures:
    """Every text answered by the champion, and by the candidate's shadow run (with another class if ``disagree``)."""
    captures = Captures(cfg)
    for number, text in enumerate(texts(cfg)):
        mine = answer(captures.predictor, text)
        theirs = rotated(mine, captures.predictor.labels) if disagree else mine
        captures.request(number, [mine, captures.by_candidate(theirs, shadow=True)])
    captures.write()
    return captures


def canary_window(
    cfg: Settings, change: Callable[[str], str] = str, rotate: bool = False, ms: float = 12.0
) -> Captures:
    """Every other text answered by the candidate (on ``change`` of the text, rotated if asked, in ``ms``), the rest
    by the champion."""
    captures = Captures(cfg)
    for number, text in enumerate(texts(cfg)):
        if number % 2:
            captured = answer(captures.predictor, change(text))
            captured = rotated(captured, captures.predictor.labels) if rotate else captured
            captures.request(number, [captures.by_candidate(captured, shadow=False)], ms)
        else:
            captures.request(number, [answer(captures.predictor, text)])
    captures.write()
    return captures


def monitored(cfg: Settings) -> tuple[Outcome, Any]:
    """The monitor step's work in this process, and its run."""
    with step_run(cfg, "monitor") as run:
        outcome = watch(cfg.monitor, cfg.storage, cfg.registry, cfg.seed)
    return outcome, MlflowClient().get_run(run.info.run_id)


def candidate_tags(cfg: Settings) -> dict[str, str]:
    return MlflowClient().get_model_version(cfg.registry.model_name, "2").tags


# ---- shadow ----


def test_a_shadow_that_agrees_is_judged_promote_and_nothing_moves_without_act(
    configure: Callable[..., Settings],
) -> None:
    cfg = configure(*WINDOW)
    rollout.start(cfg.registry, cfg.storage, 2, "shadow", 0.1)
    shadow_window(cfg)
    before = history(cfg)
    outcome, run = monitored(cfg)
    assert outcome.rollout is not None and outcome.rollout.verdict == PROMOTE, outcome.line()
    assert run.data.tags[ROLLOUT_VERDICT_TAG] == PROMOTE and ROLLOUT_ACTED_TAG not in run.data.tags
    assert run.data.metrics["rollout.agreement"] == 1 and run.data.metrics["rollout.pairs"] == TEXTS
    assert run.data.metrics["rollout.candidate.answers"] == run.data.metrics["rollout.champion.answers"] == TEXTS
    assert run.data.metrics["rollout.candidate.mean_confidence"] == pytest.approx(
        run.data.metrics["rollout.champion.mean_confidence"]
    )
    assert "drifted_share" in " ".join(run.data.metrics)  # the candidate compared with its own reference
    assert candidate_tags(cfg)[ROLLOUT_VERDICT_TAG] == PROMOTE
    assert "agreement 1.000" in candidate_tags(cfg)[ROLLOUT_WHY_TAG]
    assert "monitor.rollout.act=false: not carried out" in outcome.line()
    assert aliases(MlflowClient(), cfg.registry.model_name)[CANDIDATE] == 2 and history(cfg) == before


def test_a_shadow_below_min_answers_waits_and_act_does_nothing(configure: Callable[..., Settings]) -> None:
    cfg = configure(*WINDOW, f"monitor.rollout.min_answers={TEXTS + 1}", "monitor.rollout.act=true")
    rollout.start(cfg.registry, cfg.storage, 2, "shadow", 0.1)
    shadow_window(cfg, disagree=True)
    before = history(cfg)
    outcome, run = monitored(cfg)
    assert outcome.rollout is not None and outcome.rollout.verdict == WAIT
    assert outcome.rollout.why == [f"v2 has {TEXTS} answers of the {TEXTS + 1} that it needs"]
    assert run.data.tags[ROLLOUT_ACTED_TAG] == "waited"
    assert served(cfg)["candidate"]["version"] == 2 and history(cfg) == before


def test_a_shadow_that_disagrees_is_aborted_by_the_monitor(configure: Callable[..., Settings]) -> None:
    cfg = configure(*WINDOW, "monitor.rollout.act=true")
    rollout.start(cfg.registry, cfg.storage, 2, "shadow", 0.1)
    shadow_window(cfg, disagree=True)
    outcome, run = monitored(cfg)
    assert outcome.rollout is not None and outcome.rollout.verdict == ABORT, outcome.line()
    assert run.data.metrics["rollout.agreement"] == 0
    assert run.data.tags[ROLLOUT_WHY_TAG].startswith("agreement 0.000 (at least 0.9)")
    assert run.data.tags[ROLLOUT_ACTED_TAG] == f"aborted the rollout: @{CHAMPION} v1 serves alone"
    assert aliases(MlflowClient(), cfg.registry.model_name).get(CANDIDATE) is None
    assert served(cfg)["version"] == 1 and "candidate" not in served(cfg)
    assert history(cfg)[-1] == (1, None, "abort", "monitor")
    assert candidate_tags(cfg)[ROLLOUT_VERDICT_TAG] == ABORT


# ---- canary ----


@pytest.mark.integration
def test_a_good_canary_is_promoted_by_the_monitor_step(configure: Callable[..., Settings]) -> None:
    """``python -m steps.monitor`` as a scheduler runs it: one line with the verdict, why, and what it did."""
    cfg = configure(*WINDOW)
    rollout.start(cfg.registry, cfg.storage, 2, "canary", 0.5)
    canary_window(cfg)
    rollout_id = served(cfg)["candidate"]["rollout"]
    done = run_step(
        "monitor",
        f"tracking.uri={cfg.tracking.uri}",
        f"storage.uri={cfg.storage.uri}",
        f"registry.model_name={cfg.registry.model_name}",
        *WINDOW,
        "monitor.rollout.act=true",
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (line,) = [line for line in done.stdout.splitlines() if "rollout v2" in line]
    assert f"rollout v2 (canary at 50%, rollout {rollout_id}) against @champion v1: promote: " in line
    assert "p95 latency 12 ms against 12 ms" in line and f"promoted v2 to @{CHAMPION}" in line
    assert aliases(MlflowClient(), cfg.registry.model_name) == {CHAMPION: 2, PREVIOUS: 1}
    assert served(cfg)["version"] == 2 and "candidate" not in served(cfg)
    assert history(cfg)[-1] == (2, None, "promote", "monitor")


def test_a_canary_that_drifts_from_its_reference_is_aborted(configure: Callable[..., Settings]) -> None:
    cfg = configure(*WINDOW, "monitor.rollout.min_answers=100", "monitor.rollout.act=true")
    rollout.start(cfg.registry, cfg.storage, 2, "canary", 0.5)
    canary_window(cfg, change=lambda text: " ".join([text] * 4))  # its texts four times as long
    outcome, run = monitored(cfg)
    assert outcome.rollout is not None and outcome.rollout.verdict == ABORT, outcome.line()
    assert "tokens" in run.data.tags[ROLLOUT_WHY_TAG] and "from its reference" in run.data.tags[ROLLOUT_WHY_TAG]
    assert history(cfg)[-1] == (1, None, "abort", "monitor")


def test_a_canary_less_accurate_on_labels_is_aborted(configure: Callable[..., Settings], tmp_path: Path) -> None:
    """Labels that agree with the champion's answers: the canary, answering another class, falls below it."""
    cfg = configure(*WINDOW)
    rollout.start(cfg.registry, cfg.storage, 2, "canary", 0.5)
    captures = canary_window(cfg, rotate=True)
    labels = tmp_path / "labels.csv"  # the champion's class of each text, whichever version answered it
    pd.DataFrame(
        {
            "text_sha256": [text_sha256(text) for text in texts(cfg)],
            "label": [answer(captures.predictor, text)["class"] for text in texts(cfg)],
        }
    ).to_csv(labels, index=False)
    outcome, run = monitored(configure(*WINDOW, f"monitor.labels={labels}"))
    assert outcome.rollout is not None and outcome.rollout.verdict == ABORT, outcome.line()
    assert run.data.metrics["rollout.champion.live_accuracy"] == 1
    assert run.data.metrics["rollout.candidate.live_accuracy"] == 0
    assert "live accuracy 0.000 on 150 labelled against 1.000 on 150" in run.data.tags[ROLLOUT_WHY_TAG]
    assert served(cfg)["candidate"]["version"] == 2  # act=false: reported, not carried out


def test_a_slower_canary_is_aborted(configure: Callable[..., Settings]) -> None:
    cfg = configure(*WINDOW)
    rollout.start(cfg.registry, cfg.storage, 2, "canary", 0.5)
    canary_window(cfg, ms=40.0)
    outcome, run = monitored(cfg)
    assert outcome.rollout is not None and outcome.rollout.verdict == ABORT, outcome.line()
    assert outcome.rollout.why == ["p95 latency 40 ms against 12 ms (at most 2.0x)"]
    assert run.data.metrics["rollout.candidate.latency_p95_ms"] == 40
