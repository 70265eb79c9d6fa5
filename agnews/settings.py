"""The config groups' schemas: what each key's type is and which values it allows.

Each dataclass is registered in Hydra's ConfigStore as ``<group>/schema``, and the group's YAML files take it through
their defaults list (``defaults: [schema, _self_]``), as in Hydra's "Structured Config schema" tutorial. The values,
defaults included, stay in conf/: the schemas declare no defaults (MISSING), so a key that a YAML file forgets fails
too. Hydra checks each key's type when it merges a file or an override (``train.epochs=abc``), and ``validate``
instantiates each group, which runs the ranges in ``__post_init__`` (``train.epochs=0``) and resolves the
interpolations (``${model.recipe.learning_rate}``, ``${oc.env:SAMPLE_SIZE,5000}``) against their types.

``int | float`` keeps a number as it was written, so that ``train.epochs=1`` is still ``1``, not ``1.0``, in the
run's parameters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from datetime import datetime
from operator import attrgetter
from typing import Any, ClassVar

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from agnews.errors import ConfigError
from bundle.layout import MODES

PRECISIONS = ("auto", "bf16", "fp16", "fp32")  # train.precision: agnews/precision.py resolves each
WINDOW = re.compile(r"\d+[mhd]")  # monitor.window: minutes, hours or days


def _positive_or_none(value: int | float | None) -> bool:
    return value is None or value > 0


class Schema:
    """A config node's schema: ``__post_init__`` checks each key's range (``ranges``) and names the first one out."""

    prefix: ClassVar[str]  # the node's dotted path in the config

    def ranges(self) -> dict[str, tuple[bool, str]]:
        """Each checked key: whether its value is allowed, and what is."""
        return {}

    def __post_init__(self) -> None:
        for key, (ok, allowed) in self.ranges().items():
            if not ok:
                value = attrgetter(key)(self)
                raise ConfigError(f"{self.prefix}.{key}={value} is out of range: it must be {allowed}")


@dataclass
class DataSettings(Schema):
    prefix: ClassVar[str] = "data"
    source: str | None = MISSING
    train_file: str | None = MISSING
    test_file: str | None = MISSING
    labels: list[str] = MISSING
    sample_size: int | None = MISSING
    val_size: int = MISSING
    test_size: int | None = MISSING
    misclassified_examples: int = MISSING

    def ranges(self) -> dict[str, tuple[bool, str]]:
        return {
            "sample_size": ((self.sample_size or 0) >= 0, ">= 0 (0 or null: every row)"),
            "val_size": (self.val_size > 0, "> 0"),
            "test_size": ((self.test_size or 0) >= 0, ">= 0 (0 or null: every row)"),
            "misclassified_examples": (self.misclassified_examples >= 0, ">= 0"),
        }


@dataclass
class TrainSettings(Schema):
    prefix: ClassVar[str] = "train"
    epochs: int | float = MISSING
    learning_rate: int | float = MISSING
    weight_decay: int | float = MISSING
    label_smoothing: int | float = MISSING
    warmup_ratio: int | float = MISSING
    lr_scheduler: str = MISSING
    batch_size: int = MISSING
    eval_batch_size: int = MISSING
    max_length: int = MISSING
    pad_to_max_length: bool = MISSING
    group_by_length: bool = MISSING
    early_stopping_patience: int | None = MISSING
    resume: bool = MISSING
    output_dir: str = MISSING
    save_total_limit: int | None = MISSING
    logging_steps: int = MISSING
    onnx_opset: int = MISSING
    serving_batch_size: int = MISSING
    precision: str = MISSING
    tf32: bool = MISSING
    dataloader_workers: int = MISSING
    pad_to_multiple_of: int | str | None = MISSING  # auto, null or a positive integer

    def ranges(self) -> dict[str, tuple[bool, str]]:
        pad = self.pad_to_multiple_of
        pad_ok = pad == "auto" or pad is None or (isinstance(pad, int) and pad >= 0)
        return {
            "epochs": (self.epochs > 0, "> 0"),
            "learning_rate": (self.learning_rate > 0, "> 0"),
            "batch_size": (self.batch_size > 0, "> 0"),
            "eval_batch_size": (self.eval_batch_size > 0, "> 0"),
            "serving_batch_size": (self.serving_batch_size > 0, "> 0"),
            "max_length": (self.max_length > 0, "> 0"),
            "weight_decay": (self.weight_decay >= 0, ">= 0"),
            "warmup_ratio": (0 <= self.warmup_ratio < 1, "in [0, 1)"),
            "label_smoothing": (0 <= self.label_smoothing < 1, "in [0, 1)"),
            "early_stopping_patience": (_positive_or_none(self.early_stopping_patience), "> 0 or null"),
            "logging_steps": (self.logging_steps > 0, "> 0"),
            "precision": (self.precision in PRECISIONS, f"one of {', '.join(PRECISIONS)}"),
            "dataloader_workers": (self.dataloader_workers >= 0, ">= 0"),
            "pad_to_multiple_of": (pad_ok, "auto, null or >= 0 (0 or null: no padding beyond the longest text)"),
        }


@dataclass
class ModelRecipe:  # the training settings a model needs, which train/default.yaml takes; TrainSettings checks them
    learning_rate: int | float = MISSING
    warmup_ratio: int | float = MISSING
    label_smoothing: int | float = MISSING


@dataclass
class ModelSettings(Schema):
    prefix: ClassVar[str] = "model"
    name: str = MISSING
    display_name: str = MISSING
    tokenizer: str = MISSING
    init: dict[str, Any] | None = MISSING  # a random model's config (``model_type`` and its arguments), or null
    hub_timeout_s: int | float = MISSING
    recipe: ModelRecipe = field(default_factory=ModelRecipe)
    search: dict[str, Any] = MISSING  # each key a train setting, with Optuna's suggest_<type> arguments

    def ranges(self) -> dict[str, tuple[bool, str]]:
        return {"hub_timeout_s": (self.hub_timeout_s > 0, "> 0")}

    def __post_init__(self) -> None:
        super().__post_init__()
        settings = {f.name for f in fields(TrainSettings)}
        for key, spec in self.search.items():
            if key not in settings:
                raise ConfigError(f"model.search.{key}: no such train setting to search")
            if not isinstance(spec, dict) or "type" not in spec:
                raise ConfigError(f"model.search.{key}: give its type (float, int or categorical) and arguments")


@dataclass
class StorageSettings(Schema):
    prefix: ClassVar[str] = "storage"
    uri: str = MISSING
    dataset_prefix: str = MISSING
    model_prefix: str = MISSING
    multipart_threshold_mb: int | float = MISSING
    multipart_chunksize_mb: int | float = MISSING
    max_concurrency: int = MISSING
    connect_timeout_s: int | float = MISSING
    max_attempts: int = MISSING
    lease_s: int | float = MISSING
    lease_wait_s: int | float = MISSING

    def ranges(self) -> dict[str, tuple[bool, str]]:
        return {
            "multipart_threshold_mb": (self.multipart_threshold_mb > 0, "> 0"),
            "multipart_chunksize_mb": (self.multipart_chunksize_mb > 0, "> 0"),
            "max_concurrency": (self.max_concurrency > 0, "> 0"),
            "connect_timeout_s": (self.connect_timeout_s > 0, "> 0"),
            "max_attempts": (self.max_attempts > 0, "> 0"),
            "lease_s": (self.lease_s > 0, "> 0"),
            "lease_wait_s": (self.lease_wait_s >= 0, ">= 0"),
        }


@dataclass
class RegistrySettings(Schema):
    prefix: ClassVar[str] = "registry"
    model_name: str = MISSING
    gate: str = MISSING
    min_accuracy: int | float = MISSING
    tolerance: int | float = MISSING
    min_behaviour_pass_rate: int | float = MISSING
    run_id: str | None = MISSING
    version: int | None = MISSING
    rollback: bool = MISSING
    rollout: str | None = MISSING  # shadow or canary: a version that passes the gate becomes @candidate
    rollout_weight: int | float = MISSING  # a canary's share of the texts

    def ranges(self) -> dict[str, tuple[bool, str]]:
        return {
            "min_accuracy": (0 <= self.min_accuracy <= 1, "in [0, 1]"),
            "tolerance": (0 <= self.tolerance <= 1, "in [0, 1]"),
            "min_behaviour_pass_rate": (0 <= self.min_behaviour_pass_rate <= 1, "in [0, 1]"),
            "version": (_positive_or_none(self.version), "> 0 or null"),
            "rollout": (self.rollout in (None, *MODES), f"one of {', '.join(MODES)}, or null"),
            "rollout_weight": (0 < self.rollout_weight <= 1, "in (0, 1]"),
        }

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rollback and self.version is not None:
            raise ConfigError("registry.rollback=true and registry.version are exclusive: set one")
        if (self.rollback or self.version is not None) and self.run_id:
            raise ConfigError("registry.run_id registers a new version: do not combine it with a rollback or version")


@dataclass
class CleanupSettings:  # its ranges are TrackingSettings' (a nested schema is built with MISSING values)
    stale_after_minutes: int | float = MISSING
    dry_run: bool = MISSING


@dataclass
class TrackingSettings(Schema):
    prefix: ClassVar[str] = "tracking"
    uri: str = MISSING
    experiment: str = MISSING
    connect_timeout_s: int | float = MISSING
    cleanup: CleanupSettings = field(default_factory=CleanupSettings)

    def ranges(self) -> dict[str, tuple[bool, str]]:
        return {
            "connect_timeout_s": (self.connect_timeout_s > 0, "> 0"),
            "cleanup.stale_after_minutes": (self.cleanup.stale_after_minutes >= 0, ">= 0"),
        }


@dataclass
class PrunerSettings:  # optuna.pruners.MedianPruner's arguments; their ranges are TuneSettings'
    n_startup_trials: int = MISSING
    n_warmup_steps: int = MISSING


# tune.study names the study in its RDB, its MLflow runs and its recipe file (<study>.yaml): a slug.
STUDY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
STUDY_RULE = "a slug of 1 to 128 letters, digits, '.', '_' and '-', starting with a letter or digit"


@dataclass
class TuneSettings(Schema):
    prefix: ClassVar[str] = "tune"
    study: str = MISSING
    storage: str | None = MISSING
    trials: int = MISSING
    timeout_s: int | float | None = MISSING
    startup_trials: int = MISSING
    pruner: PrunerSettings = field(default_factory=PrunerSettings)
    early_stopping_patience: int | None = MISSING
    heartbeat_s: int = MISSING  # Optuna's heartbeat_interval: whole seconds
    retrain: bool = MISSING
    join_timeout_s: int | float = MISSING
    recipe_dir: str = MISSING
    overwrite: bool = MISSING

    def ranges(self) -> dict[str, tuple[bool, str]]:
        return {
            "study": (STUDY.fullmatch(self.study) is not None, STUDY_RULE),
            "storage": (self.storage is None or bool(self.storage.strip()), "an RDB URL, or null (not blank)"),
            "trials": (self.trials > 0, "> 0"),
            "timeout_s": (_positive_or_none(self.timeout_s), "> 0 or null"),
            "startup_trials": (self.startup_trials >= 0, ">= 0"),
            "pruner.n_startup_trials": (self.pruner.n_startup_trials >= 0, ">= 0"),
            "pruner.n_warmup_steps": (self.pruner.n_warmup_steps >= 0, ">= 0"),
            "early_stopping_patience": (_positive_or_none(self.early_stopping_patience), "> 0 or null"),
            "heartbeat_s": (self.heartbeat_s > 0, "> 0"),
            "join_timeout_s": (self.join_timeout_s > 0, "> 0"),
        }


@dataclass
class WebhookSettings(Schema):
    prefix: ClassVar[str] = "webhook"
    reconcile_s: int | float = MISSING
    read_timeout_s: int | float = MISSING
    threads: int = MISSING
    connections: int = MISSING
    test_deliveries: int = MISSING
    tries: int = MISSING
    http_timeout_s: int | float = MISSING

    def ranges(self) -> dict[str, tuple[bool, str]]:
        return {
            "reconcile_s": (self.reconcile_s > 0, "> 0"),
            "read_timeout_s": (self.read_timeout_s > 0, "> 0"),
            "threads": (self.threads > 0, "> 0"),
            "connections": (self.connections > 0, "> 0"),
            "test_deliveries": (self.test_deliveries > 0, "> 0"),
            "tries": (self.tries > 0, "> 0"),
            "http_timeout_s": (self.http_timeout_s > 0, "> 0"),
        }


ENGINES = ("local", "spark")  # predict.engine: agnews/scoring/local.py and agnews/scoring/spark.py
INPUT_FORMATS = ("auto", "csv", "json", "parquet")  # predict.format; auto: by the files' extensions


@dataclass
class SparkSettings:  # predict.spark; its ranges are PredictSettings'
    master: str | None = MISSING
    partitions: int = MISSING


@dataclass
class PredictSettings(Schema):
    prefix: ClassVar[str] = "predict"
    model: str = MISSING
    input: str | None = MISSING
    format: str = MISSING
    text_column: str = MISSING
    keep_columns: list[str] = MISSING
    output: str | None = MISSING
    overwrite: bool = MISSING
    engine: str = MISSING
    workers: int = MISSING
    chunk_rows: int = MISSING
    max_chars: int = MISSING
    progress: bool = MISSING
    spark: SparkSettings = field(default_factory=SparkSettings)

    def ranges(self) -> dict[str, tuple[bool, str]]:
        return {
            "model": (self.model.startswith("models:/"), "a models:/<name>/<version> or models:/<name>@<alias> URI"),
            "format": (self.format in INPUT_FORMATS, f"one of {', '.join(INPUT_FORMATS)}"),
            "engine": (self.engine in ENGINES, f"one of {', '.join(ENGINES)}"),
            "workers": (self.workers >= 0, ">= 0 (0: a process per usable CPU)"),
            "chunk_rows": (self.chunk_rows > 0, "> 0"),
            "max_chars": (self.max_chars > 0, "> 0"),
            "spark.partitions": (self.spark.partitions >= 0, ">= 0 (0: as Spark reads the input)"),
        }


def _time_or_none(text: str | None) -> bool:
    try:
        return text is None or bool(datetime.fromisoformat(text))
    except ValueError:
        return False


FAIL_ON = ("drift", "never")  # monitor.fail_on: whether a drift verdict ends the step with a non-zero status
ON_DRIFT = ("none", "retrain")  # monitor.on_drift: what a drift verdict does besides tagging


@dataclass
class RolloutJudgeSettings:  # monitor.rollout: its ranges are MonitorSettings'
    min_answers: int = MISSING
    min_agreement: int | float = MISSING
    max_confidence_drop: int | float = MISSING
    max_low_confidence_rise: int | float = MISSING
    max_accuracy_drop: int | float = MISSING
    max_latency_ratio: int | float = MISSING
    act: bool = MISSING


@dataclass
class MonitorSettings(Schema):
    prefix: ClassVar[str] = "monitor"
    window: str = MISSING
    since: str | None = MISSING
    until: str | None = MISSING
    min_answers: int = MISSING
    low_confidence: int | float = MISSING
    drift_share: int | float = MISSING
    text_sample: int = MISSING
    labels: str | None = MISSING
    max_accuracy_drop: int | float = MISSING
    confidence_level: int | float = MISSING
    bad_line_samples: int = MISSING
    fail_on: str = MISSING
    on_drift: str = MISSING
    rollout: RolloutJudgeSettings = field(default_factory=RolloutJudgeSettings)

    def ranges(self) -> dict[str, tuple[bool, str]]:
        judge = self.rollout
        return {
            "window": (WINDOW.fullmatch(self.window) is not None and int(self.window[:-1]) > 0, "<n>m, <n>h or <n>d"),
            "since": (_time_or_none(self.since), "an ISO 8601 time or null"),
            "until": (_time_or_none(self.until), "an ISO 8601 time or null"),
            "min_answers": (self.min_answers > 0, "> 0"),
            "low_confidence": (0 < self.low_confidence < 1, "in (0, 1)"),
            "drift_share": (0 < self.drift_share <= 1, "in (0, 1]"),
            "text_sample": (self.text_sample > 0, "> 0"),
            "max_accuracy_drop": (0 <= self.max_accuracy_drop <= 1, "in [0, 1]"),
            "confidence_level": (0 < self.confidence_level < 1, "in (0, 1)"),
            "bad_line_samples": (self.bad_line_samples >= 0, ">= 0"),
            "fail_on": (self.fail_on in FAIL_ON, f"one of {', '.join(FAIL_ON)}"),
            "on_drift": (self.on_drift in ON_DRIFT, f"one of {', '.join(ON_DRIFT)}"),
            "rollout.min_answers": (judge.min_answers > 0, "> 0"),
            "rollout.min_agreement": (0 <= judge.min_agreement <= 1, "in [0, 1]"),
            "rollout.max_confidence_drop": (0 <= judge.max_confidence_drop <= 1, "in [0, 1]"),
            "rollout.max_low_confidence_rise": (0 <= judge.max_low_confidence_rise <= 1, "in [0, 1]"),
            "rollout.max_accuracy_drop": (0 <= judge.max_accuracy_drop <= 1, "in [0, 1]"),
            "rollout.max_latency_ratio": (judge.max_latency_ratio >= 1, ">= 1"),
        }


# Each config group's schema, as conf/<group>/*.yaml take it (`defaults: [schema, _self_]`).
SCHEMAS: dict[str, type[Schema]] = {
    "data": DataSettings,
    "train": TrainSettings,
    "model": ModelSettings,
    "storage": StorageSettings,
    "registry": RegistrySettings,
    "tracking": TrackingSettings,
    "tune": TuneSettings,
    "webhook": WebhookSettings,
    "predict": PredictSettings,
    "monitor": MonitorSettings,
}
for _group, _schema in SCHEMAS.items():
    ConfigStore.instance().store(group=_group, name="schema", node=_schema)

SEEDS = 2**32  # numpy's seeds, which transformers' set_seed passes it: 0 to 2**32 - 1


@dataclass(frozen=True)
class Settings:
    """The composed config, typed: each group's schema object, and the seed of every random choice."""

    data: DataSettings
    train: TrainSettings
    model: ModelSettings
    storage: StorageSettings
    registry: RegistrySettings
    tracking: TrackingSettings
    tune: TuneSettings
    webhook: WebhookSettings
    predict: PredictSettings
    monitor: MonitorSettings
    seed: int

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < SEEDS:
            raise ConfigError(f"seed={self.seed} is out of range: it must be an integer in [0, {SEEDS})")


def one_line(exc: OmegaConfBaseException) -> str:
    """OmegaConf's error as one line that names the key: ``train.epochs=abc: Value 'abc' ... to Integer``."""
    message = str(exc.msg).splitlines()[0] if exc.msg else type(exc).__name__
    if not exc.full_key:
        return message
    return f"{exc.full_key}: {message}" if exc.value is None else f"{exc.full_key}={exc.value}: {message}"


def validate(cfg: DictConfig) -> Settings:
    """The typed settings of a composed config: each group instantiated from its schema, which resolves its
    interpolations against the types and checks the ranges.

    Raises ConfigError, in one line that names the key, for the first value out of its type or range.
    """
    groups: dict[str, Any] = {}
    for group in SCHEMAS:
        try:
            groups[group] = OmegaConf.to_object(cfg[group])
        except OmegaConfBaseException as exc:
            raise ConfigError(one_line(exc)) from None
    try:
        seed = cfg.seed
    except OmegaConfBaseException as exc:
        raise ConfigError(one_line(exc)) from None
    return Settings(seed=seed, **groups)
