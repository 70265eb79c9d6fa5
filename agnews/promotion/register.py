"""The register step: the registry update (gate, aliases) and, for a new @champion, the mirror to storage, under one
lease.

The model's lease (``mirror.model_lease``) is held from before the registry is read until storage matches it, so any
number of concurrent ``register`` and ``mirror`` calls, against one tracking server and one bucket, end as if they
had run one after another. Every registry and storage write checks first that the lease is still held: a register
paused past its lease, whose lease another took over, changes nothing more and fails with a LeaseError.
"""

from __future__ import annotations

from typing import cast

import mlflow

from agnews.errors import HistoryError, LeaseError, PipelineError
from agnews.names import How
from agnews.promotion.mirror import ModelStore, model_lease, publish, reconcile
from agnews.promotion.registry import Verdict, update
from agnews.settings import RegistrySettings, StorageSettings


def how_promoted(registry: RegistrySettings) -> How:
    """How a register call that promotes moves @champion: ``rollback``, ``manual`` (registry.version) or ``gate``."""
    if registry.rollback:
        return "rollback"
    return "gate" if registry.version is None else "manual"


def register(
    registry: RegistrySettings, storage: StorageSettings, experiment: str, run_id: str | None = None
) -> Verdict:
    """Bring storage in line with the registry (``mirror.reconcile``), update the registry (``registry.update``:
    register the train run ``run_id``, else the newest finished one in ``experiment``, or roll back, or promote
    ``registry.version``), mirror a new @champion to storage, tag the active run.

    A failed mirror leaves the storage pointer on the previous complete version; the error says how to catch up.
    """
    model = ModelStore.open(registry, storage)
    with model_lease(model, storage, "register") as (lease, client):
        reconcile(model, lease, client, "register")
        outcome = update(client, registry, experiment, run_id)
        mlflow.set_tags(outcome.tags())
        if outcome.promoted or outcome.staged:
            how = registry.rollout if outcome.staged else how_promoted(registry)
            try:
                mlflow.set_tags(publish(model, lease, client, "register", cast(How, how)).tags())
            except (LeaseError, HistoryError):  # a HistoryError says where the pointer is
                raise
            except PipelineError as exc:
                raise type(exc)(
                    f"{outcome.model_name} v{outcome.version} is @{outcome.alias}, but mirroring it failed: {exc}. "
                    "Storage still points at the previous complete version: fix this, then run "
                    "`python -m steps.mirror`"
                ) from None
    return outcome
