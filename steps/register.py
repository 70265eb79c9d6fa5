"""The `register` step: register a train run's model behind the quality gate, and mirror a new champion."""

from agnews.config import entrypoint
from agnews.promotion.register import register
from agnews.settings import Settings
from agnews.tracking import step_run


@entrypoint
def main(cfg: Settings) -> None:
    with step_run(cfg, "register"):
        register(cfg.registry, cfg.storage, cfg.tracking.experiment, cfg.registry.run_id)


if __name__ == "__main__":
    main()
