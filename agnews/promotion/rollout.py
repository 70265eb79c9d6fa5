"""The rollout step: a new version meets live traffic beside @champion, as a shadow or a canary, before it serves.

``start`` makes a version @candidate (``registry.make_candidate``: its mode, canary weight and rollout id as version
tags) and mirrors it into ``champion.json``'s ``candidate`` (``bundle.layout.Candidate``), which the Lambda serves
beside the champion; ``promote`` makes the candidate @champion, the champion it replaces @previous; ``abort`` drops
the candidate. Each runs under the model's lease, after a reconcile (``mirror.reconcile``), which also finishes or
undoes a step that was killed half-way: the registry's aliases are the record, and storage follows them. Each change
of ``champion.json`` is appended to the promotion history, ``how`` being ``shadow``, ``canary``, ``promote`` or
``abort``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import cast

from mlflow import MlflowClient

from agnews.errors import RolloutError
from agnews.names import BY_ROLLOUT, CANDIDATE, CHAMPION, How, Via
from agnews.promotion.mirror import (
    Mirrored,
    ModelStore,
    model_lease,
    publish,
    read_pointer,
    reconcile,
    registry_candidate,
)
from agnews.promotion.registry import aliases, make_candidate, no_rollout, promote
from agnews.settings import RegistrySettings, StorageSettings
from bundle.layout import MODES, Candidate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Status:
    """The registry's @champion and @candidate (with its mode, weight and rollout id), and what storage serves."""

    model_name: str
    champion: int | None
    candidate: tuple[int, str, float, str] | None  # version, mode, weight, rollout id
    served: int | None
    served_candidate: Candidate | None

    def __str__(self) -> str:
        champion = f"@{CHAMPION} v{self.champion}" if self.champion is not None else f"no @{CHAMPION}"
        if self.candidate is None:
            line = f"{self.model_name}: {champion}, no rollout under way"
        else:
            version, mode, weight, rollout = self.candidate
            share = f" answering {weight:.0%} of the texts" if mode == "canary" else ""
            line = f"{self.model_name}: {champion}, @{CANDIDATE} v{version} in {mode} mode{share} (rollout {rollout})"
        served = "nothing" if self.served is None else f"v{self.served}"
        if self.served_candidate is not None:
            served += f" with candidate v{self.served_candidate.version} ({self.served_candidate.mode})"
        return f"{line}; storage serves {served}"


def check_mode(mode: str, weight: float) -> None:
    if mode not in MODES:
        raise RolloutError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    if not 0 < weight <= 1:
        raise RolloutError(f"weight {weight} is not in (0, 1]")


def start(
    registry: RegistrySettings, storage: StorageSettings, version: int, mode: str, weight: float, via: Via = "rollout"
) -> Mirrored:
    """Make ``version`` @candidate in ``mode`` (a canary answers ``weight`` of the texts) and serve it beside
    @champion; a RolloutError while another rollout is under way."""
    check_mode(mode, weight)
    model = ModelStore.open(registry, storage)
    with model_lease(model, storage, "rollout start") as (lease, client):
        reconcile(model, lease, client, via)
        no_rollout(client, model.name)
        rollout = make_candidate(client, model.name, version, mode, weight)
        log.info("%s v%s is @%s in %s mode (rollout %s)", model.name, version, CANDIDATE, mode, rollout)
        return publish(model, lease, client, via, cast(How, mode))


def _candidate(
    registry: RegistrySettings, storage: StorageSettings, step: str, via: Via, promoting: bool, rollout: str | None
) -> Mirrored:
    model = ModelStore.open(registry, storage)
    with model_lease(model, storage, f"rollout {step}") as (lease, client):
        reconcile(model, lease, client, via)
        found = registry_candidate(client, model.name)
        if found is None:
            raise RolloutError(f"no rollout of {model.name} is under way: start one with `steps.rollout start`")
        if rollout is not None and found[3] != rollout:
            raise RolloutError(f"the rollout under way is {found[3]} (v{found[0]}), not {rollout}: nothing done")
        version = found[0]
        if promoting:
            promote(client, model.name, version, BY_ROLLOUT)
        client.delete_registered_model_alias(model.name, CANDIDATE)
        log.info("%s v%s: rollout %s %s", model.name, version, found[3], "promoted" if promoting else "aborted")
        return publish(model, lease, client, via, "promote" if promoting else "abort")


def promote_candidate(
    registry: RegistrySettings, storage: StorageSettings, via: Via = "rollout", rollout: str | None = None
) -> Mirrored:
    """Make @candidate @champion (the champion it replaces becomes @previous) and serve it alone; with ``rollout``,
    only if that is still the rollout under way (checked under the lease)."""
    return _candidate(registry, storage, "promote", via, True, rollout)


def abort(
    registry: RegistrySettings, storage: StorageSettings, via: Via = "rollout", rollout: str | None = None
) -> Mirrored:
    """Drop @candidate: @champion serves alone; with ``rollout``, only if that is still the rollout under way."""
    return _candidate(registry, storage, "abort", via, False, rollout)


def status(registry: RegistrySettings, storage: StorageSettings) -> Status:
    """Where the rollout stands, in the registry and in storage (read only, without the lease)."""
    model = ModelStore.open(registry, storage)
    client = MlflowClient()
    pointer = read_pointer(model.storage, model.pointer)
    return Status(
        model.name,
        aliases(client, model.name).get(CHAMPION),
        registry_candidate(client, model.name),
        pointer.version if pointer else None,
        pointer.candidate if pointer else None,
    )
