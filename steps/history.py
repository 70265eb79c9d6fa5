"""The `history` entry point: the model's promotion history, newest first, or the version served at a time.

    python -m steps.history [--at 2025-01-02T03:04:05Z] [overrides ...]

It reads ``<storage.model_prefix>/<registry.model_name>/history/`` in storage (``agnews.promotion.history``); a time
without a zone is UTC.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime

from agnews.config import command, compose
from agnews.promotion.history import served_at
from agnews.promotion.mirror import promotion_history


def utc_time(text: str) -> datetime | None:
    """An ISO 8601 time, UTC when it names no zone; None for an empty one (an MLproject parameter left empty)."""
    if not text:
        return None
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


@command
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m steps.history", description=__doc__.split("\n\n")[0])
    parser.add_argument("--at", type=utc_time, help="an ISO 8601 time: print only the version served then")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for the other steps")
    args = parser.parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    cfg = compose(args.overrides)
    entries = promotion_history(cfg.registry, cfg.storage)
    if args.at is None:
        print("\n".join(map(str, entries)) if entries else "no promotion recorded yet")
    else:
        entry = served_at(entries, args.at)
        print(f"at {args.at.isoformat()}: {entry.to}, since {entry}" if entry else f"at {args.at}: nothing served")


if __name__ == "__main__":
    main()
