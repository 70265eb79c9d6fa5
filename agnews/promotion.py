"""Promotion: the registry update (gate, aliases) and, for a new @champion, the mirror to storage, under one lease.

The model's lease (``publishing.model_lease``) is held from before the registry is read until storage matches it, so
any number of concurrent ``register`` and ``mirror`` calls, against one tracking server and one bucket, end as if
they had run one after another. Every registry and storage write checks first that the lease is still held: a
register paused past its lease, whose lease another took over, changes nothing more and fails with a LeaseError.
"""

from __future__ import annotations

import mlflow
from omegaconf import DictConfig

from agnews import registry
from agnews.errors import PipelineError
from agnews.lease import LeaseError
from agnews.publishing import How, model_lease, publish, reconcile
from agnews.storage import open_storage


def how_promoted(cfg: DictConfig) -> How:
    """How a register call that promotes moves @champion: ``rollback``, ``manual`` (registry.version) or ``gate``."""
    if cfg.registry.rollback:
        return "rollback"
    return "gate" if cfg.registry.version is None else "manual"


def register(cfg: DictConfig) -> registry.Verdict:
    """Bring storage in line with the registry (``publishing.reconcile``), update the registry (``registry.update``),
    mirror a new @champion to storage, tag the active run.

    A failed mirror leaves the storage pointer on the previous complete version; the error says how to catch up.
    """
    storage = open_storage(cfg.storage)
    with model_lease(cfg, storage, "register") as (lease, client):
        reconcile(cfg, storage, lease, client)
        outcome = registry.update(cfg, client)
        mlflow.set_tags(outcome.tags())
        if outcome.promoted:
            try:
                mlflow.set_tags(publish(cfg, storage, lease, client, how_promoted(cfg)).tags())
            except LeaseError:
                raise
            except PipelineError as exc:
                raise type(exc)(
                    f"{outcome.model_name} v{outcome.version} is @champion, but mirroring it failed: {exc}. Storage "
                    "still points at the previous complete version: fix this, then run `python -m steps.mirror`"
                ) from None
    return outcome
