"""The ``monitor`` step's work: read a window of captured answers, judge each served version against its reference
and, with labels, its registered test accuracy, and log it all into the active MLflow run.

A version with at least ``monitor.min_answers`` answers is judged: ``drift`` when at least ``monitor.drift_share``
of its columns drifted or its live accuracy fell more than ``monitor.max_accuracy_drop`` below its registered test
accuracy, ``ok`` otherwise, and ``no reference`` when it has neither a reference nor labels to be judged by. The
run's verdict is ``drift`` if a version drifted, else ``ok`` if one was judged; a window with no version to judge
is ``too few answers``. The run and each version judged get the verdict as the ``monitor.verdict`` tag.

During a rollout the candidate is also judged against the champion (``candidate``): its verdict, ``promote``,
``abort`` or ``wait``, is tagged on the run and on the candidate's version, and carried out with
``monitor.rollout.act=true``.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from agnews.monitoring import reference
from agnews.monitoring.candidate import Judgement, Rollout, carry_out, judge_rollout, under_way
from agnews.monitoring.captures import Read, Window, read_window, window
from agnews.monitoring.labels import Labels, Live, live_accuracy, matched, read_labels
from agnews.names import (
    DRIFT,
    MONITOR_VERDICT_TAG,
    NO_REFERENCE,
    OK,
    REFERENCE_ARTIFACT,
    ROLLOUT_ACTED_TAG,
    ROLLOUT_VERDICT_TAG,
    ROLLOUT_WHY_TAG,
    TEST_ACCURACY,
    TOO_FEW,
)
from agnews.promotion.registry import version_accuracy
from agnews.settings import MonitorSettings, RegistrySettings, StorageSettings
from agnews.storage import open_storage

if TYPE_CHECKING:
    from agnews.monitoring.drift import Drift

log = logging.getLogger(__name__)


@dataclass
class VersionReport:
    """What the window says of one served version."""

    version: int
    answers: int
    mean_confidence: float
    low_confidence_share: float
    class_shares: dict[str, float]
    note: str | None = None  # why it was not compared: too few answers, no reference, not registered
    drift: Drift | None = None
    drifted: bool = False  # at least monitor.drift_share of the columns drifted
    test_accuracy: float | None = None
    live: Live | None = None
    accuracy_drop: bool = False

    @property
    def verdict(self) -> str:
        """TOO_FEW, NO_REFERENCE (enough answers, but neither a reference nor labels to judge them by), DRIFT or OK."""
        if self.drift is None and self.live is None:
            return TOO_FEW if self.answers_short else NO_REFERENCE
        return DRIFT if self.drifted or self.accuracy_drop else OK

    answers_short: bool = False  # fewer than monitor.min_answers


@dataclass
class Outcome:
    """The step's findings: the window, what was read, each version's report and the verdict."""

    span: Window
    answers: int
    objects: int
    bad_lines: int
    bad_samples: list[str]
    versions: list[VersionReport]
    labels_rows: int | None = None
    labels_matched: int | None = None
    rollout: Judgement | None = None  # the candidate against the champion, during a rollout

    @property
    def verdict(self) -> str:
        """DRIFT if a version drifted, else OK if one was judged, else NO_REFERENCE or TOO_FEW."""
        verdicts = {v.verdict for v in self.versions}
        return next((verdict for verdict in (DRIFT, OK, NO_REFERENCE) if verdict in verdicts), TOO_FEW)

    def line(self) -> str:
        """The outcome in one line."""
        if not self.versions:
            return f"{TOO_FEW}: no answers from {self.span}"
        parts = []
        for v in self.versions:
            what = f"v{v.version} {v.verdict}: {v.answers} answers"
            if v.drift is not None and v.drift.drifted:
                what += f", drifted on {', '.join(v.drift.drifted)} ({len(v.drift.drifted)} of {len(v.drift.scores)})"
            if v.live is not None:
                what += f", live accuracy {v.live.accuracy:.3f} on {v.live.labelled} labelled"
                if v.test_accuracy is not None:
                    what += f" (test {v.test_accuracy:.3f}{', a drop' if v.accuracy_drop else ''})"
            if v.note:
                what += f" ({v.note})"
            parts.append(what)
        bad = f"; {self.bad_lines} capture lines skipped" if self.bad_lines else ""
        rollout = f"; {self.rollout.line()}" if self.rollout else ""
        return f"{self.verdict}: {'; '.join(parts)}, from {self.span}{bad}{rollout}"


def _reference(client: MlflowClient, model_name: str, version: int, tmp: Path) -> tuple[object, str | None]:
    """The version's registered model version and its reference profile; a note instead where there is none."""
    try:
        registered = client.get_model_version(model_name, str(version))
    except MlflowException:
        return None, f"v{version} of {model_name} is not in the registry"
    if not registered.run_id:
        return registered, "no reference: the version has no source run"
    try:
        path = mlflow.artifacts.download_artifacts(
            run_id=registered.run_id, artifact_path=REFERENCE_ARTIFACT, dst_path=str(tmp)
        )
    except (MlflowException, OSError):
        return registered, f"no reference: its run {registered.run_id} has no {REFERENCE_ARTIFACT}"
    return registered, path


def judge(
    read: Read,
    settings: MonitorSettings,
    model_name: str,
    labels: Labels | None,
    client: MlflowClient,
    tmp: Path,
    candidate: int | None = None,
) -> list[VersionReport]:
    """A report for each version in the window; a rollout's ``candidate`` is judged from ``monitor.rollout``'s
    ``min_answers`` on."""
    reports = []
    answers = read.answers
    for version, count in sorted(answers.counts().items()):
        needed = settings.rollout.min_answers if version == candidate else settings.min_answers
        frame = answers.frame(version)
        shares = frame[reference.PREDICTED].value_counts(normalize=True)
        report = VersionReport(
            version=version,
            answers=count,
            mean_confidence=float(frame[reference.CONFIDENCE].mean()),
            low_confidence_share=float((frame[reference.CONFIDENCE] < settings.low_confidence).mean()),
            class_shares={str(k): float(v) for k, v in shares.items()},
        )
        reports.append(report)
        if count < needed:
            report.answers_short = True
            setting = "monitor.rollout.min_answers" if version == candidate else "monitor.min_answers"
            report.note = f"fewer than {setting}={needed}"
            continue
        registered, found = _reference(client, model_name, version, tmp)
        if registered is not None:
            report.test_accuracy = version_accuracy(client, registered)  # type: ignore[arg-type]
        if labels is not None:
            report.live = live_accuracy(answers, labels, answers.rows(version), settings.confidence_level)
            report.accuracy_drop = bool(
                report.live is not None
                and report.test_accuracy is not None
                and report.test_accuracy - report.live.accuracy > settings.max_accuracy_drop
            )
        if found is None or not Path(found).is_file():
            report.note = found
            log.warning("v%d: %s", version, found)
            continue
        from agnews.monitoring.drift import drift  # Evidently takes seconds to import: only to compare

        profile = reference.read(Path(found))
        report.drift = drift(profile, frame, answers.texts.get(version), settings.drift_share)
        report.drifted = bool(report.drift.drifted) and report.drift.share >= settings.drift_share
    return reports


def watch(settings: MonitorSettings, storage: StorageSettings, registry: RegistrySettings, seed: int) -> Outcome:
    """Read ``monitor``'s window of the model's captures, judge each version and, during a rollout, the candidate
    against the champion, and log it all into the active run; with ``monitor.rollout.act``, carry the rollout's
    verdict out."""
    model_name = registry.model_name
    span = window(settings, datetime.now(UTC))
    read = read_window(open_storage(storage), model_name, span, settings, seed)
    labels = read_labels(settings.labels) if settings.labels else None
    client = MlflowClient()
    rollout = under_way(registry, storage, client)
    candidate = rollout.candidate if rollout else None
    with tempfile.TemporaryDirectory() as tmp:
        versions = judge(read, settings, model_name, labels, client, Path(tmp), candidate) if len(read.answers) else []
    outcome = Outcome(
        span=span,
        answers=len(read.answers),
        objects=read.objects,
        bad_lines=read.bad.count,
        bad_samples=read.bad.samples,
        versions=versions,
        labels_rows=labels.rows if labels else None,
        labels_matched=matched(read.answers, labels) if labels else None,
        rollout=_judge_rollout(read, versions, rollout, settings),
    )
    log_outcome(outcome, client, model_name)
    if outcome.rollout is not None and settings.rollout.act:
        outcome.rollout.acted = carry_out(outcome.rollout, registry, storage, client)
        mlflow.set_tag(ROLLOUT_ACTED_TAG, outcome.rollout.acted)
    return outcome


def _judge_rollout(
    read: Read, versions: list[VersionReport], rollout: Rollout | None, settings: MonitorSettings
) -> Judgement | None:
    if rollout is None:
        return None
    return judge_rollout(read.answers, {v.version: v for v in versions}, rollout, settings.rollout)


def _metrics(v: VersionReport) -> dict[str, float]:
    prefix = f"v{v.version}."
    metrics = {
        f"{prefix}answers": v.answers,
        f"{prefix}mean_confidence": v.mean_confidence,
        f"{prefix}low_confidence_share": v.low_confidence_share,
        **{f"{prefix}class_share.{label}": share for label, share in v.class_shares.items()},
    }
    if v.drift is not None:
        metrics |= {f"{prefix}drift.{column}": score for column, score in v.drift.scores.items()}
        metrics |= {f"{prefix}drifted.{column}": float(column in v.drift.drifted) for column in v.drift.scores}
        metrics[f"{prefix}drifted_share"] = v.drift.share
    if v.test_accuracy is not None:
        metrics[f"{prefix}{TEST_ACCURACY}"] = v.test_accuracy
    if v.live is not None:
        metrics |= {
            f"{prefix}live_accuracy": v.live.accuracy,
            f"{prefix}live_accuracy_low": v.live.low,
            f"{prefix}live_accuracy_high": v.live.high,
            f"{prefix}labelled": v.live.labelled,
        }
    return metrics


def log_outcome(outcome: Outcome, client: MlflowClient, model_name: str) -> None:
    """The outcome into the active run: metrics, tags, the reports' HTML, the skipped lines; and the verdict tagged
    on each version judged."""
    metrics: dict[str, float] = {"answers": outcome.answers, "objects": outcome.objects, "bad_lines": outcome.bad_lines}
    if outcome.labels_rows is not None:
        metrics |= {"labels.rows": outcome.labels_rows, "labels.matched": outcome.labels_matched or 0}
    tags = {
        MONITOR_VERDICT_TAG: outcome.verdict,
        "monitor.since": outcome.span.since.isoformat(),
        "monitor.until": outcome.span.until.isoformat(),
        "monitor.versions": ",".join(str(v.version) for v in outcome.versions),
    }
    for v in outcome.versions:
        metrics |= _metrics(v)
        tags[f"v{v.version}.verdict"] = v.verdict
        if v.drift is not None:
            tags[f"v{v.version}.drifted_columns"] = ",".join(v.drift.drifted)
        if v.note:
            tags[f"v{v.version}.note"] = v.note
        if v.accuracy_drop:
            tags[f"v{v.version}.accuracy_drop"] = "true"
        for name, html in (v.drift.html if v.drift else {}).items():
            mlflow.log_text(html, f"drift/v{v.version}-{name}.html")
    mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
    mlflow.set_tags(tags)
    if outcome.bad_samples:
        mlflow.log_text("\n".join(outcome.bad_samples) + "\n", "bad_lines.txt")
    summary = {
        "verdict": outcome.verdict,
        "window": {"since": outcome.span.since.isoformat(), "until": outcome.span.until.isoformat()},
        "answers": outcome.answers,
        "bad_lines": outcome.bad_lines,
        "versions": [
            {k: val for k, val in asdict(v).items() if k != "drift"}
            | {"verdict": v.verdict, "drifted": v.drift.drifted if v.drift else None}
            | {"scores": v.drift.scores if v.drift else None}
            for v in outcome.versions
        ],
    }
    mlflow.log_text(json.dumps(summary, indent=2, default=str), "monitor.json")
    for v in outcome.versions:
        if v.verdict != TOO_FEW and not (v.note or "").endswith("not in the registry"):
            client.set_model_version_tag(model_name, str(v.version), MONITOR_VERDICT_TAG, v.verdict)
    if outcome.rollout is not None:
        _log_rollout(outcome.rollout, client, model_name)


def _log_rollout(judgement: Judgement, client: MlflowClient, model_name: str) -> None:
    """The comparison as the run's metrics; the verdict and why as tags of the run and of the candidate's version."""
    rollout = judgement.rollout
    why = "; ".join(judgement.why)
    mlflow.log_metrics({k: float(v) for k, v in judgement.metrics.items()})
    mlflow.set_tags(
        {
            ROLLOUT_VERDICT_TAG: judgement.verdict,
            ROLLOUT_WHY_TAG: why,
            "monitor.rollout.candidate": str(rollout.candidate),
            "monitor.rollout.champion": str(rollout.champion),
            "monitor.rollout.mode": rollout.mode,
            "monitor.rollout.id": rollout.rollout,
        }
    )
    client.set_model_version_tag(model_name, str(rollout.candidate), ROLLOUT_VERDICT_TAG, judgement.verdict)
    client.set_model_version_tag(model_name, str(rollout.candidate), ROLLOUT_WHY_TAG, why)
