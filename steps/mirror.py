"""The `mirror` step: copy @champion's serving bundle to storage, verify it, and only then move the pointer."""

import mlflow

from agnews.config import entrypoint
from agnews.promotion.mirror import mirror
from agnews.settings import Settings
from agnews.tracking import step_run


@entrypoint
def main(cfg: Settings) -> None:
    with step_run(cfg, "mirror"):
        mlflow.set_tags(mirror(cfg.registry, cfg.storage).tags())


if __name__ == "__main__":
    main()
