"""The `tune` step: an Optuna study over the model's recipe (trials as child runs), then its winner re-trained and
registered. Any number of these processes with the same ``tune.study`` and ``tune.storage`` share the study."""

from omegaconf import DictConfig

from agnews.config import entrypoint
from agnews.tuning import tune


@entrypoint
def main(cfg: DictConfig) -> None:
    tune(cfg)


if __name__ == "__main__":
    main()
