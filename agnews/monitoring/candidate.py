"""A rollout judged on live traffic: the candidate that serves beside @champion (``champion.json``'s ``candidate``,
or the registry's @candidate) compared with the champion on the window's answers, and the verdict ``promote``,
``abort`` or ``wait`` carried out, where ``monitor.rollout.act`` asks, by the rollout step's own functions.

The comparisons (docs/monitoring.md, "Judging a rollout"): in shadow mode, the agreement of the candidate's shadow
answers with the champion's answers to the same texts of the same requests; of each, the mean confidence, the share
below ``monitor.low_confidence`` and, with labels, the live accuracy; the candidate's drift from its own reference
(``watch.judge``, by Evidently); and in canary mode the requests' latency. The capture records hold no errors (a
request that failed captures nothing), so errors are left to the Lambda's metrics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from mlflow import MlflowClient

from agnews.errors import RolloutError
from agnews.monitoring.captures import Answers
from agnews.names import ABORT, CHAMPION, PROMOTE, ROLLOUT_METRIC_PREFIX, WAIT
from agnews.promotion.mirror import ModelStore, read_pointer, registry_candidate
from agnews.promotion.registry import aliases
from agnews.promotion.rollout import abort, promote_candidate
from agnews.settings import RegistrySettings, RolloutJudgeSettings, StorageSettings
from bundle.layout import MODES

if TYPE_CHECKING:
    from agnews.monitoring.watch import VersionReport

SHADOW, CANARY = MODES


@dataclass(frozen=True)
class Rollout:
    """A rollout under way: the champion, the candidate, its mode and canary weight, and the rollout's id."""

    champion: int
    candidate: int
    mode: str
    weight: float
    rollout: str

    def __str__(self) -> str:
        share = f" at {self.weight:.0%}" if self.mode == CANARY else ""
        return f"v{self.candidate} ({self.mode}{share}, rollout {self.rollout}) against @{CHAMPION} v{self.champion}"


def under_way(registry: RegistrySettings, storage: StorageSettings, client: MlflowClient) -> Rollout | None:
    """The rollout that ``champion.json`` serves (what the captures came from), else the registry's @candidate;
    None when neither names one."""
    model = ModelStore.open(registry, storage)
    pointer = read_pointer(model.storage, model.pointer)
    if pointer is not None and pointer.candidate is not None:
        c = pointer.candidate
        return Rollout(pointer.version, c.version, c.mode, c.weight, c.rollout)
    found = registry_candidate(client, registry.model_name)
    champion = aliases(client, registry.model_name).get(CHAMPION)
    if found is None or champion is None:
        return None
    return Rollout(champion, *found)


@dataclass(frozen=True)
class Check:
    """One comparison: whether the candidate passed it, and what was compared."""

    passed: bool
    what: str


@dataclass
class Judgement:
    """The candidate against the champion on the window's traffic, and the verdict."""

    rollout: Rollout
    verdict: str
    why: list[str]
    metrics: dict[str, float] = field(default_factory=dict)
    acted: str | None = None  # what monitor.rollout.act did; None when it was not asked

    def line(self) -> str:
        """The verdict, why, and what was done, in one line's part."""
        acted = self.acted or "monitor.rollout.act=false: not carried out"
        return f"rollout {self.rollout}: {self.verdict}: {', '.join(self.why)}; {acted}"


def agreement(answers: Answers, rollout: Rollout) -> tuple[float | None, int]:
    """The share of the candidate's shadow answers whose class is the champion's for the same request and text, and
    how many were paired; None when none was."""
    shadow = answers.rows(rollout.candidate, shadow=True)
    served = answers.rows(rollout.champion, shadow=False)
    _, at_shadow, at_served = np.intersect1d(
        answers.pair_keys(shadow), answers.pair_keys(served), assume_unique=False, return_indices=True
    )
    if not len(at_shadow):
        return None, 0
    same = answers.codes(shadow[at_shadow]) == answers.codes(served[at_served])
    return float(same.mean()), len(at_shadow)


def _side(report: VersionReport | None, answers: Answers) -> dict[str, float]:
    """One side's figures, by metric name: answers, confidence, live accuracy and its requests' latency."""
    if report is None:
        return {"answers": 0}
    latency = answers.latencies(answers.rows(report.version))
    figures = {
        "answers": report.answers,
        "mean_confidence": report.mean_confidence,
        "low_confidence_share": report.low_confidence_share,
        "latency_p50_ms": float(np.percentile(latency, 50)),
        "latency_p95_ms": float(np.percentile(latency, 95)),
    }
    if report.live is not None:
        figures |= {"live_accuracy": report.live.accuracy, "labelled": report.live.labelled}
    if report.drift is not None:
        figures["drifted_share"] = report.drift.share
    return figures


def _checks(
    rollout: Rollout,
    candidate: VersionReport,
    champion: VersionReport | None,
    shared: float | None,
    figures: dict[str, dict[str, float]],
    settings: RolloutJudgeSettings,
) -> list[Check]:
    """Each comparison that the window's answers allow."""
    checks = []
    if shared is not None:
        checks.append(
            Check(shared >= settings.min_agreement, f"agreement {shared:.3f} (at least {settings.min_agreement})")
        )
    if candidate.drift is None:
        checks.append(Check(True, f"drift not checked ({candidate.note})"))
    else:
        drifted = ", ".join(candidate.drift.drifted)
        what = f"drifted on {drifted} from its reference" if candidate.drifted else "no drift from its reference"
        checks.append(Check(not candidate.drifted, what))
    if champion is None:
        checks.append(Check(True, f"no answers of v{rollout.champion} to compare with"))
        return checks
    drop = champion.mean_confidence - candidate.mean_confidence
    checks.append(
        Check(
            drop <= settings.max_confidence_drop,
            f"mean confidence {candidate.mean_confidence:.3f} against {champion.mean_confidence:.3f}"
            f" (a fall of at most {settings.max_confidence_drop})",
        )
    )
    rise = candidate.low_confidence_share - champion.low_confidence_share
    checks.append(
        Check(
            rise <= settings.max_low_confidence_rise,
            f"low-confidence share {candidate.low_confidence_share:.3f} against {champion.low_confidence_share:.3f}"
            f" (a rise of at most {settings.max_low_confidence_rise})",
        )
    )
    if candidate.live is not None and champion.live is not None:
        checks.append(
            Check(
                champion.live.accuracy - candidate.live.accuracy <= settings.max_accuracy_drop,
                f"live accuracy {candidate.live.accuracy:.3f} on {candidate.live.labelled} labelled against"
                f" {champion.live.accuracy:.3f} on {champion.live.labelled} (a fall of at most"
                f" {settings.max_accuracy_drop})",
            )
        )
    if rollout.mode == CANARY:
        mine, theirs = figures["candidate"]["latency_p95_ms"], figures["champion"]["latency_p95_ms"]
        checks.append(
            Check(
                mine <= settings.max_latency_ratio * theirs,
                f"p95 latency {mine:.0f} ms against {theirs:.0f} ms (at most {settings.max_latency_ratio}x)",
            )
        )
    return checks


def judge_rollout(
    answers: Answers, reports: dict[int, VersionReport], rollout: Rollout, settings: RolloutJudgeSettings
) -> Judgement:
    """The candidate against the champion on the window's answers: ``wait`` below ``settings.min_answers`` of the
    candidate's (or, in shadow mode, with no shadow answer paired with the champion's), ``abort`` when a comparison
    fails, ``promote`` when every one passes."""
    candidate, champion = reports.get(rollout.candidate), reports.get(rollout.champion)
    figures = {
        "candidate": _side(candidate, answers),
        "champion": _side(champion, answers),
    }
    shared, pairs = agreement(answers, rollout) if rollout.mode == SHADOW else (None, 0)
    metrics = {f"{ROLLOUT_METRIC_PREFIX}{side}.{k}": v for side, values in figures.items() for k, v in values.items()}
    if rollout.mode == SHADOW:
        metrics[f"{ROLLOUT_METRIC_PREFIX}pairs"] = pairs
        if shared is not None:
            metrics[f"{ROLLOUT_METRIC_PREFIX}agreement"] = shared
    count = candidate.answers if candidate else 0
    if candidate is None or count < settings.min_answers:
        why = [f"v{rollout.candidate} has {count} answers of the {settings.min_answers} that it needs"]
        return Judgement(rollout, WAIT, why, metrics)
    checks = _checks(rollout, candidate, champion, shared, figures, settings)
    failed = [check.what for check in checks if not check.passed]
    if failed:
        return Judgement(rollout, ABORT, failed, metrics)
    if rollout.mode == SHADOW and not pairs:
        why = [f"none of v{rollout.candidate}'s shadow answers pairs with an answer of v{rollout.champion}"]
        return Judgement(rollout, WAIT, why, metrics)
    return Judgement(rollout, PROMOTE, [check.what for check in checks], metrics)


def carry_out(judgement: Judgement, registry: RegistrySettings, storage: StorageSettings, client: MlflowClient) -> str:
    """The verdict carried out by the rollout step's functions (under the model's lease, recorded in the promotion
    history as ``via=monitor``), unless the registry's rollout is no longer the one judged; what was done."""
    rollout = judgement.rollout
    if judgement.verdict == WAIT:
        return "waited"
    found = registry_candidate(client, registry.model_name)
    if found is None or (found[0], found[3]) != (rollout.candidate, rollout.rollout):
        now = f"v{found[0]} (rollout {found[3]})" if found else "no @candidate"
        return f"not carried out: the registry has {now} now"
    try:
        if judgement.verdict == PROMOTE:
            promote_candidate(registry, storage, via="monitor", rollout=rollout.rollout)
            return f"promoted v{rollout.candidate} to @{CHAMPION}"
        abort(registry, storage, via="monitor", rollout=rollout.rollout)
        return f"aborted the rollout: @{CHAMPION} v{rollout.champion} serves alone"
    except RolloutError as exc:
        return f"not carried out: {exc}"
