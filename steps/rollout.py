"""The `rollout` entry point: a new version meets live traffic beside @champion before it serves alone.

    python -m steps.rollout start --version N --mode shadow|canary [--weight 0.1] [overrides ...]
    python -m steps.rollout promote|abort|status [overrides ...]

``start`` makes version N @candidate and serves it beside @champion: as a ``shadow`` it runs on every text and only
the champion answers; as a ``canary`` it answers ``--weight`` of the texts. ``promote`` makes it @champion (the
champion becomes @previous), ``abort`` drops it. ``python -m steps.monitor`` judges a rollout, and carries its
verdict out with ``monitor.rollout.act=true`` (docs/rollout.md).
"""

from __future__ import annotations

import argparse
import sys

import mlflow

from agnews.config import command, compose
from agnews.names import ROLLOUT_ACTION_TAG
from agnews.promotion import rollout
from agnews.tracking import connect, step_run
from bundle.layout import MODES


def optional_int(text: str) -> int | None:
    """An integer; None for an empty one (an MLproject parameter left empty)."""
    return int(text) if text else None


@command
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m steps.rollout", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("start", "promote", "abort", "status"))
    parser.add_argument("--version", type=optional_int, help="start: the version to roll out")
    parser.add_argument("--mode", choices=("", *MODES), help="start: shadow or canary")
    parser.add_argument("--weight", type=float, default=0.1, help="start: a canary's share of the texts (0.1)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for the other steps")
    args = parser.parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    if args.action == "start" and (args.version is None or not args.mode):
        parser.error("start needs --version and --mode")
    cfg = compose(args.overrides)
    if args.action == "status":
        connect(cfg.tracking)
        print(rollout.status(cfg.registry, cfg.storage))
        return
    with step_run(cfg, "rollout"):
        mlflow.set_tag(ROLLOUT_ACTION_TAG, args.action)
        if args.action == "start":
            done = rollout.start(cfg.registry, cfg.storage, args.version, args.mode, args.weight)
        elif args.action == "promote":
            done = rollout.promote_candidate(cfg.registry, cfg.storage)
        else:
            done = rollout.abort(cfg.registry, cfg.storage)
        mlflow.set_tags(done.tags())
        print(f"{args.action}: {rollout.status(cfg.registry, cfg.storage)}")


if __name__ == "__main__":
    main()
