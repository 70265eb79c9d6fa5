"""The `main` step: upload -> train -> register (with mirror), as nested child runs of one parent run."""

from omegaconf import DictConfig

from agnews.config import entrypoint
from agnews.pipeline import pipeline


@entrypoint
def main(cfg: DictConfig) -> None:
    pipeline(cfg)


if __name__ == "__main__":
    main()
