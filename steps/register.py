"""The `register` step: register a train run's model behind the quality gate, and mirror a new champion."""

from __future__ import annotations

import mlflow
from omegaconf import DictConfig

from steps import registry
from steps.config import entrypoint
from steps.errors import PipelineError
from steps.mirror import mirror
from steps.tracking import step_run


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


@entrypoint
def main(cfg: DictConfig) -> None:
    with step_run(cfg, "register"):
        register(cfg)


if __name__ == "__main__":
    main()
