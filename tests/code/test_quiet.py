"""What the steps print: no layer lists from transformers and no artifact progress bars in a log. (The upload
step's schema hint is checked on its real command line in test_upload.py.)"""

from __future__ import annotations

import logging
from pathlib import Path

import mlflow
import pytest

from agnews.modeling import load_model, load_tokenizer
from agnews.settings import Settings
from agnews.tracking import connect


def test_loading_a_pretrained_model_prints_no_layer_list(
    make_cfg, capfd: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
) -> None:
    """transformers' LOAD REPORT for the new head is read, not printed; and silencing it does not set off the
    tensor-parallel check that lists every layer 'not sharded' on one line."""
    caplog.set_level(logging.INFO, logger="agnews")
    cfg = make_cfg("model=minilm")
    load_model(cfg.model, list(cfg.data.labels), load_tokenizer(cfg.model))
    out, err = capfd.readouterr()
    assert "not sharded" not in out + err
    assert "LOAD REPORT" not in out + err
    assert "new classification head initialised (classifier.bias, classifier.weight)" in caplog.text


def test_artifact_transfers_draw_no_bars_in_a_log(
    make_cfg, make_cfg_store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture
) -> None:
    """A step's stderr here is captured, not a terminal, as in a log file: MLflow's artifact bars stay off."""
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "unset below, restored after the test")
    monkeypatch.delenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    cfg: Settings = make_cfg()
    connect(cfg.tracking)
    files = tmp_path / "files"
    files.mkdir()
    for name in ("a.txt", "b.txt", "c.txt"):
        (files / name).write_text(name)
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(files), "files")
    downloaded = mlflow.artifacts.download_artifacts(f"runs:/{run.info.run_id}/files", dst_path=str(tmp_path / "d"))
    assert sorted(p.name for p in Path(downloaded).iterdir()) == ["a.txt", "b.txt", "c.txt"]
    out, err = capfd.readouterr()
    assert "Downloading artifacts" not in out + err
