"""The `mirror` step: copy @champion's serving bundle to storage, verify it, and only then move the pointer."""

import mlflow
from omegaconf import DictConfig

from agnews.config import entrypoint
from agnews.publishing import mirror
from agnews.tracking import step_run


@entrypoint
def main(cfg: DictConfig) -> None:
    with step_run(cfg, "mirror"):
        mlflow.set_tags(mirror(cfg).tags())


if __name__ == "__main__":
    main()
