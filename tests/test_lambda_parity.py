"""Parity: on the full AG News test split, the Lambda's class agrees with the registered torch pyfunc's."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd
from lambda_fixtures import MODEL_NAME, mirror_version

from steps.data import read_split
from steps.storage import open_storage
from steps.tracking import step_run
from steps.train import train
from steps.upload import upload

MIN_AGREEMENT = 0.99
MAX_PROBABILITY_GAP = 0.05  # int8 against fp32, per class and text
TEST_ROWS = 7600


def test_handler_agrees_with_the_registered_pyfunc_on_the_full_test_split(
    make_cfg, agnews_dir: Path, serve, tmp_path: Path
) -> None:
    cfg = make_cfg(
        "model=tiny",
        f"data.source={agnews_dir}",
        "data.sample_size=400",
        "data.eval_size=200",
        "train.epochs=1",
    )
    upload(cfg)
    with step_run(cfg, "train") as run:
        train(cfg)
    registered = mlflow.register_model(f"runs:/{run.info.run_id}/model", cfg.registry.model_name)
    model_uri = f"models:/{cfg.registry.model_name}/{registered.version}"

    bundle = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(tmp_path / "pyfunc"))) / "artifacts"
    root = tmp_path / "mirror" / "models" / MODEL_NAME
    mirror_version(bundle / "serving", root, int(registered.version))

    texts = read_split(open_storage(cfg), cfg.storage.dataset_prefix, "test").text.tolist()
    assert len(texts) == TEST_ROWS
    expected = mlflow.pyfunc.load_model(model_uri).predict(pd.DataFrame({"text": texts}))

    invoke = serve(root)
    batch = 64  # MAX_BATCH's default
    answered = []
    for start in range(0, len(texts), batch):
        response = invoke({"texts": texts[start : start + batch]})
        assert response["statusCode"] == 200
        answered += response["body"]
    got = pd.DataFrame([body["probabilities"] | {"predicted_class": body["predicted_class"]} for body in answered])
    agreement = (got["predicted_class"] == expected["predicted_class"]).mean()
    assert agreement >= MIN_AGREEMENT, f"agreement {agreement:.4f}"
    labels = list(cfg.data.labels)
    assert (got[labels] - expected[labels]).abs().to_numpy().max() <= MAX_PROBABILITY_GAP
