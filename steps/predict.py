"""The `predict` step: score a whole dataset with a registered version's int8 bundle, locally or on Spark."""

from agnews.config import entrypoint
from agnews.settings import Settings
from agnews.tracking import step_run


@entrypoint
def main(settings: Settings) -> None:
    from agnews.scoring.job import checked, predict

    job = checked(settings.predict)  # the input and the output, before the run
    with step_run(settings, "predict"):
        predict(job)


if __name__ == "__main__":
    main()
