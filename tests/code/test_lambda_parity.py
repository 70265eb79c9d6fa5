"""Parity: on the full AG News test split, the Lambda's class agrees with the registered torch pyfunc's.

The model goes the pipeline's way: upload, train (tiny), register (gate opened) and mirror to local storage. The
Lambda is the deployment zip, unpacked and run on its own (its onnxruntime, not the project's).
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd

from agnews.data import read_split
from agnews.promotion.register import register
from agnews.storage import open_storage
from agnews.tracking import step_run
from agnews.training import train
from agnews.upload import upload
from tests.helpers import LambdaPackage, invoke_packaged

MIN_AGREEMENT = 0.99
MAX_PROBABILITY_GAP = 0.05  # int8 against fp32, per class and text
TEST_ROWS = 7600


def test_handler_agrees_with_the_registered_pyfunc_on_the_full_test_split(
    make_cfg, agnews_dir: Path, lambda_package: LambdaPackage, tmp_path: Path
) -> None:
    cfg = make_cfg(
        "preset=test",
        f"data.source={agnews_dir}",
        "data.sample_size=400",
        "data.val_size=200",
        "data.test_size=200",
        "registry.min_accuracy=0",
        "registry.min_behaviour_pass_rate=0",
    )
    upload(cfg.data, cfg.storage)
    with step_run(cfg, "train"):
        train(cfg)
    with step_run(cfg, "register"):
        outcome = register(cfg.registry, cfg.storage, cfg.tracking.experiment, cfg.registry.run_id)
    assert outcome.promoted
    model_uri = f"models:/{outcome.model_name}/{outcome.version}"
    root = Path(cfg.storage.uri) / cfg.storage.model_prefix / outcome.model_name

    texts = read_split(open_storage(cfg.storage), cfg.storage.dataset_prefix, "test").text.tolist()
    assert len(texts) == TEST_ROWS
    expected = mlflow.pyfunc.load_model(model_uri).predict(pd.DataFrame({"text": texts}))

    batch = 64  # MAX_BATCH's default
    events = [{"texts": texts[start : start + batch]} for start in range(0, len(texts), batch)]
    responses = invoke_packaged(lambda_package.folder, root, tmp_path / "cache", events)
    assert {response["statusCode"] for response in responses} == {200}
    answered = [body for response in responses for body in response["body"]]
    got = pd.DataFrame([body["probabilities"] | {"predicted_class": body["predicted_class"]} for body in answered])
    agreement = (got["predicted_class"] == expected["predicted_class"]).mean()
    assert agreement >= MIN_AGREEMENT, f"agreement {agreement:.4f}"
    labels = list(cfg.data.labels)
    assert (got[labels] - expected[labels]).abs().to_numpy().max() <= MAX_PROBABILITY_GAP
