"""Promotion: the registry update (gate, aliases) and, for a new @champion, the mirror to storage, under one lease.

The model's lease (``publishing.model_lease``) is held from before the registry is read until storage matches it, so
any number of concurrent ``register`` and ``mirror`` calls, against one tracking server and one bucket, end as if
they had run one after another.
"""

from __future__ import annotations

import mlflow
from omegaconf import DictConfig

from agnews import registry
from agnews.errors import PipelineError
from agnews.publishing import model_lease, publish, served_version
from agnews.storage import open_storage


def register(cfg: DictConfig) -> registry.Outcome:
    """Update the registry (see ``registry.update``), mirror a new @champion to storage, tag the active run.

    A failed mirror leaves the storage pointer on the previous complete version; the error says how to catch up.
    """
    storage = open_storage(cfg)
    with model_lease(cfg, storage, "register") as lease:
        outcome = registry.update(cfg, served_version(storage, cfg))
        mlflow.set_tags(outcome.tags())
        if outcome.promoted:
            try:
                how = "rollback" if cfg.registry.rollback else "gate" if cfg.registry.version is None else "manual"
                mlflow.set_tags(publish(cfg, storage, lease, how).tags())
            except PipelineError as exc:
                raise type(exc)(
                    f"{outcome.model_name} v{outcome.version} is @champion, but mirroring it failed: {exc}. Storage "
                    "still points at the previous complete version: fix this, then run `python -m steps.mirror`"
                ) from None
    return outcome
