"""The `main` step: upload -> train -> register (with mirror), as nested child runs of one parent run."""

from agnews.config import entrypoint
from agnews.settings import Settings


@entrypoint
def main(cfg: Settings) -> None:
    # torch and transformers load after the config has composed: a bad override is answered in a second, not ten
    from agnews.pipeline import pipeline

    pipeline(cfg)


if __name__ == "__main__":
    main()
