"""The `train` step: fine-tune with the HF Trainer, log everything to MLflow, log the pyfunc with its int8 bundle.

Under torchrun or ``accelerate launch`` every rank trains, and only rank 0 opens the run and logs.
"""

from agnews.config import entrypoint
from agnews.settings import Settings
from agnews.tracking import step_run


@entrypoint
def main(cfg: Settings) -> None:
    # torch and transformers load after the config has composed: a bad override is answered in a second, not ten
    from agnews.training import is_main_process, train

    if is_main_process():
        with step_run(cfg, "train"):
            train(cfg)
    else:
        train(cfg)


if __name__ == "__main__":
    main()
