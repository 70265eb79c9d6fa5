"""The `register` step: register a train run's model behind the quality gate, and mirror a new champion."""

from omegaconf import DictConfig

from agnews.config import entrypoint
from agnews.promotion import register
from agnews.tracking import step_run


@entrypoint
def main(cfg: DictConfig) -> None:
    with step_run(cfg, "register"):
        register(cfg)


if __name__ == "__main__":
    main()
