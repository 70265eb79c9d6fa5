"""The serving bundle's export does not depend on the precision or mode the model is in, and leaves it untouched.

The export runs on a float32 CPU copy of the model. A model on another device cannot be built here (no CUDA, and
a model on `meta` has no weights to export): `bench/gpu_check.sh` exports a CUDA-trained one.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from agnews.config import compose
from agnews.data import parse_csv
from agnews.export import export_bundle
from agnews.modeling import load_model, load_tokenizer
from agnews.settings import TrainSettings
from bundle.predictor import Predictor

# A short fit of the tiny model on AG News, enough that its predictions depend on the text and spread over the
# classes (a freshly initialised model gives every text the same class, and agreement would then prove nothing).
STEPS, BATCH, TRAIN_LENGTH, LR = 150, 32, 32, 2e-3
TEXTS = 300


@dataclass
class Tiny:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerFast
    labels: list[str]
    texts: list[str]
    train: TrainSettings  # the train config group: max_length, serving_batch_size, onnx_opset

    def logits(self, model: PreTrainedModel) -> np.ndarray:
        """Float32 torch logits of ``model``'s weights for the texts, truncated as the bundle truncates them."""
        reference = copy.deepcopy(model).float().eval()
        encoded = self.tokenizer(
            self.texts, padding=True, truncation=True, max_length=self.train.max_length, return_tensors="pt"
        )
        with torch.no_grad():
            return reference(**encoded).logits.numpy()

    def export(self, model: PreTrainedModel, out: Path) -> np.ndarray:
        """Export ``model`` as the train step does; the int8 bundle's logits for the texts."""
        t = self.train
        export_bundle(model, self.tokenizer, self.labels, t.max_length, t.serving_batch_size, out, t.onnx_opset)
        return Predictor(out).logits(self.texts)


@pytest.fixture(scope="module")
def tiny(agnews_dir: Path) -> Iterator[Tiny]:
    cfg = compose(["model=tiny"])
    labels = list(cfg.data.labels)
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model, labels, tokenizer)
    train = parse_csv(agnews_dir / "train.csv", len(labels)).sample(STEPS * BATCH, random_state=cfg.seed)
    test = parse_csv(agnews_dir / "test.csv", len(labels)).sample(TEXTS, random_state=cfg.seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is as fast, and immune to a busy machine
    try:
        optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
        model.train()
        for start in range(0, len(train), BATCH):
            rows = train.iloc[start : start + BATCH]
            batch = tokenizer(
                rows.text.tolist(), padding=True, truncation=True, max_length=TRAIN_LENGTH, return_tensors="pt"
            )
            model(**batch, labels=torch.tensor(rows.label.to_numpy())).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        yield Tiny(model, tokenizer, labels, test.text.tolist(), cfg.train)
    finally:
        torch.set_num_threads(threads)


def snapshot(model: PreTrainedModel) -> dict:
    return {
        "state": {name: tensor.clone() for name, tensor in model.state_dict().items()},
        "dtypes": {p.dtype for p in model.parameters()},
        "devices": {p.device for p in model.parameters()},
        "training": model.training,
        "attention": model.config._attn_implementation,
    }


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_exports_a_bundle_that_agrees_with_float32(
    tiny: Tiny, dtype: torch.dtype, tmp_path: Path
) -> None:
    float32 = tiny.logits(tiny.model)
    predicted = float32.argmax(1)
    assert len(set(predicted)) >= 3, "the fitted model should not give every text the same class"

    model = copy.deepcopy(tiny.model).to(dtype).train()  # as a model may come out of training: half, train mode
    before = snapshot(model)
    int8 = tiny.export(model, tmp_path / "bundle")

    agreement = (int8.argmax(1) == predicted).mean()
    assert agreement >= 0.97, f"int8 bundle agrees with the float32 model on {agreement:.1%} of {TEXTS} texts"
    # the bundle holds the model's own weights, upcast: its logits stay within int8's rounding of theirs
    upcast = tiny.logits(model)
    assert (int8.argmax(1) == upcast.argmax(1)).mean() >= 0.97
    assert np.abs(int8 - upcast).max() < 0.1 * float32.std()

    after = snapshot(model)
    assert after["dtypes"] == before["dtypes"] == {dtype}
    assert after["devices"] == before["devices"] == {torch.device("cpu")}
    assert after["training"] and after["attention"] == before["attention"]
    assert all(torch.equal(before["state"][name], tensor) for name, tensor in after["state"].items())


def test_float32_and_half_models_export_the_same_predictions(tiny: Tiny, tmp_path: Path) -> None:
    """A bf16 model's bundle predicts as the float32 model's bundle does: the export itself adds no difference."""
    from_float32 = tiny.export(tiny.model, tmp_path / "float32").argmax(1)
    from_bf16 = tiny.export(copy.deepcopy(tiny.model).to(torch.bfloat16), tmp_path / "bf16").argmax(1)
    assert (from_float32 == from_bf16).mean() >= 0.97
