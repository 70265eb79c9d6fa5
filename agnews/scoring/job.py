"""The predict step's job: check the input and the output, fetch the version's bundle, score with the chosen engine,
commit the output whole, and record the job in the active MLflow run."""

from __future__ import annotations

import json
import logging
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset

from agnews.errors import ConfigError
from agnews.scoring import model as registry_model
from agnews.scoring.output import Target, target
from agnews.scoring.rows import Counts, Model, prediction_fields
from agnews.scoring.source import Location, Source, open_source
from agnews.settings import PredictSettings
from bundle.layout import sha256

# What the run records besides its config.
ROWS, ERRORS, ROWS_PER_SECOND, SECONDS = "rows", "rows_with_errors", "rows_per_second", "seconds"
SHARE_PREFIX = "class_share."  # + a label: the share of the scored rows predicted as it
MODEL_NAME_TAG, MODEL_VERSION_TAG = "predict.model_name", "predict.model_version"
MANIFEST_TAG, OUTPUT_TAG, INPUT_SHA256_TAG = "predict.manifest_sha256", "predict.output", "predict.input_sha256"
LISTING_ARTIFACT = "input_listing.json"  # each input file's path, size and sha256
INPUT_CONTEXT, OUTPUT_CONTEXT = "input", "output"  # the contexts of the two datasets logged with mlflow.data

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Scored:
    """A finished job: the version, the counts, the seconds it scored for, and where the output is."""

    model: Model
    counts: Counts
    seconds: float
    output: str

    def metrics(self) -> dict[str, float]:
        scored = self.counts.rows - self.counts.errors
        shares = {f"{SHARE_PREFIX}{label}": 0.0 for label in self.model.labels}
        for label, n in (self.counts.classes or {}).items():
            shares[f"{SHARE_PREFIX}{label}"] = n / scored
        return {
            ROWS: self.counts.rows,
            ERRORS: self.counts.errors,
            SECONDS: self.seconds,
            ROWS_PER_SECOND: self.counts.rows / self.seconds if self.seconds else 0.0,
            **shares,
        }


class Described(MetaDataset):
    """A dataset known by its location, a digest, and a profile of figures (MLflow's ``MetaDataset`` has none)."""

    def __init__(self, location: Location, digest: str, profile: dict[str, int]) -> None:
        with warnings.catch_warnings():  # MLflow registers its local artifact source twice, and says so each call
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(location.url)
        super().__init__(source, name=location.url.rstrip("/").rpartition("/")[2], digest=digest[:8])
        self._profile = profile

    @property
    def profile(self) -> dict[str, int]:
        return self._profile


def _check_columns(settings: PredictSettings, labels: tuple[str, ...]) -> None:
    taken = {field.name for field in prediction_fields(Model("", 0, "", labels, Path()))}
    clash = sorted(taken & set(settings.keep_columns))
    if clash:
        raise ConfigError(f"predict.keep_columns: {', '.join(clash)} would clash with the output's own columns")


def score(settings: PredictSettings, source: Source, model: Model, output: Target) -> Counts:
    """Score ``source`` into the output's staging place with ``predict.engine``."""
    if settings.engine == "spark":
        from agnews.scoring.spark import score_with_spark  # pyspark: the optional extra `spark`

        return score_with_spark(settings, source, model, output.staging)
    from agnews.scoring.local import score_locally

    return score_locally(settings, source, model, output.staging)


@dataclass(frozen=True)
class Job:
    """A job whose input has been read and checked, and whose output is free (or may be replaced)."""

    settings: PredictSettings
    source: Source
    output: Target


def checked(settings: PredictSettings) -> Job:
    """The job ``settings`` describe, once its input and output are checked: a missing input, an unknown format, a
    missing column or an existing output fails here, in one line, before a run is opened or anything is written."""
    return Job(settings, open_source(settings), target(settings.output, settings.overwrite))


def predict(job: Job) -> Scored:
    """Score ``predict.input`` with ``predict.model`` into ``predict.output``, recorded in the active run."""
    settings, source, output = job.settings, job.source, job.output
    listing = source.listing()
    listing_sha256 = sha256(json.dumps(listing, sort_keys=True).encode())
    with tempfile.TemporaryDirectory(prefix="agnews-predict-") as tmp:
        model = registry_model.fetch(settings.model, Path(tmp))
        _check_columns(settings, model.labels)
        log.info("scoring %s with %s v%s (%s engine)", source.location.url, model.name, model.version, settings.engine)
        started = time.perf_counter()
        try:
            counts = score(settings, source, model, output)
            output.commit(settings.overwrite)
        except BaseException:
            output.abandon()
            raise
        seconds = time.perf_counter() - started
    done = Scored(model, counts, seconds, output.location.url)
    mlflow.log_dict({"files": listing}, LISTING_ARTIFACT)
    mlflow.log_input(Described(source.location, listing_sha256, {"files": len(listing)}), context=INPUT_CONTEXT)
    # the output is a function of the input and the version: its digest is of both
    output_digest = sha256(f"{listing_sha256} {model.manifest_sha256}".encode())
    figures = {ROWS: counts.rows, ERRORS: counts.errors}
    mlflow.log_input(Described(output.location, output_digest, figures), context=OUTPUT_CONTEXT)
    mlflow.set_tags(
        {
            MODEL_NAME_TAG: model.name,
            MODEL_VERSION_TAG: str(model.version),
            MANIFEST_TAG: model.manifest_sha256,
            INPUT_SHA256_TAG: listing_sha256,
            OUTPUT_TAG: output.location.url,
        }
    )
    mlflow.log_metrics(done.metrics())
    log.info(
        "%d rows (%d with errors) in %.1f s (%.0f rows/s) -> %s",
        counts.rows,
        counts.errors,
        seconds,
        done.metrics()[ROWS_PER_SECOND],
        output.location.url,
    )
    return done
