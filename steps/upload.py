"""The `upload` step: AG News from the Hub or local files into storage as checked JSONL."""

from agnews.config import entrypoint
from agnews.ingest import upload_and_log
from agnews.settings import Settings
from agnews.tracking import step_run


@entrypoint
def main(cfg: Settings) -> None:
    with step_run(cfg, "upload"):
        upload_and_log(cfg)


if __name__ == "__main__":
    main()
