"""Promotion: the registry update (gate, aliases) and, for a new @champion, the mirror to storage."""

from __future__ import annotations

import mlflow
from omegaconf import DictConfig

from agnews import registry
from agnews.errors import PipelineError
from agnews.publishing import mirror


def register(cfg: DictConfig) -> registry.Outcome:
    """Update the registry (see ``registry.update``), mirror a new @champion to storage, tag the active run.

    A failed mirror leaves the storage pointer on the previous complete version; the error says how to catch up.
    """
    outcome = registry.update(cfg)
    mlflow.set_tags(outcome.tags())
    if outcome.promoted:
        try:
            mlflow.set_tags(mirror(cfg).tags())
        except PipelineError as exc:
            raise type(exc)(
                f"{outcome.model_name} v{outcome.version} is @champion, but mirroring it failed: {exc}. Storage "
                "still points at the previous complete version: fix this, then run `python -m steps.mirror`"
            ) from None
    return outcome
