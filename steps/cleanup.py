"""The `cleanup` step: mark the runs that a killed step left RUNNING as KILLED (``tracking.cleanup.dry_run=true``
only lists them)."""

from agnews.cleanup import close_stale
from agnews.config import entrypoint
from agnews.settings import Settings
from agnews.tracking import step_run


@entrypoint
def main(cfg: Settings) -> None:
    with step_run(cfg, "cleanup") as run:
        close_stale(cfg.tracking.cleanup, exclude=run.info.run_id)


if __name__ == "__main__":
    main()
