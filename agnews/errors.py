"""Errors that a step reports as one clear line, without a traceback."""


class PipelineError(Exception):
    """Base class: the entry point prints the message and exits with status 1."""


class ConfigError(PipelineError):
    """A configuration value is out of range or inconsistent."""


class DataError(PipelineError):
    """A source file or stored dataset is missing or malformed."""


class StorageError(PipelineError):
    """Storage cannot be reached or refuses an operation."""


class LeaseError(StorageError):
    """A storage lease could not be had in time, or its holder lost it (agnews/lease.py)."""


class HistoryError(StorageError):
    """The promotion history cannot be written, or it holds other than the chain it wrote (promotion/history.py)."""


class NotFoundError(StorageError):
    """A key does not exist in storage."""


class TrackingError(PipelineError):
    """The MLflow tracking server or registry cannot serve the request."""


class CheckpointError(PipelineError):
    """``train.resume=true`` finds checkpoints, but none that the Trainer could resume from."""


class ModelError(PipelineError):
    """A model cannot be loaded."""


class RegistryError(PipelineError):
    """A run, model version or alias that the registry needs is missing or unusable."""


class TuneError(PipelineError):
    """A hyperparameter search cannot go on: no complete trial, or a study without its MLflow run."""


class RolloutError(RegistryError):
    """A rollout step that cannot run: none under way, one under way already, or a version that cannot be one."""
