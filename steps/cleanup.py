"""The `cleanup` step: mark the runs that a killed step left RUNNING as KILLED (``tracking.cleanup.dry_run=true``
only lists them)."""

from omegaconf import DictConfig

from agnews.config import entrypoint
from agnews.runs import close_stale
from agnews.tracking import step_run


@entrypoint
def main(cfg: DictConfig) -> None:
    with step_run(cfg, "cleanup") as run:
        close_stale(cfg.tracking.cleanup, exclude=run.info.run_id)


if __name__ == "__main__":
    main()
