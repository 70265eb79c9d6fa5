"""The `upload` step: AG News from the Hub or local files into storage as checked JSONL."""

from agnews.config import entrypoint
from agnews.settings import Settings
from agnews.tracking import step_run
from agnews.upload import upload_and_log


@entrypoint
def main(cfg: Settings) -> None:
    with step_run(cfg, "upload"):
        upload_and_log(cfg)


if __name__ == "__main__":
    main()
