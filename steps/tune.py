"""The `tune` step: an Optuna study over the model's recipe (trials as child runs), then its winner re-trained and
registered. Any number of these processes with the same ``tune.study`` and ``tune.storage`` share the study."""

from agnews.config import entrypoint
from agnews.settings import Settings


@entrypoint
def main(cfg: Settings) -> None:
    # torch and transformers load after the config has composed: a bad override is answered in a second, not ten
    from agnews.tuning import tune

    tune(cfg)


if __name__ == "__main__":
    main()
