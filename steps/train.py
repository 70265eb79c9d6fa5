"""The `train` step: fine-tune with the HF Trainer, log everything to MLflow, log the pyfunc with its int8 bundle.

Under torchrun or ``accelerate launch`` every rank trains, and only rank 0 opens the run and logs.
"""

from omegaconf import DictConfig

from agnews.config import entrypoint
from agnews.tracking import step_run
from agnews.training import is_main_process, train


@entrypoint
def main(cfg: DictConfig) -> None:
    if is_main_process():
        with step_run(cfg, "train"):
            train(cfg)
    else:
        train(cfg)


if __name__ == "__main__":
    main()
