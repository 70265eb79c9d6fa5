"""The ONNX int8 serving bundle: export, quantize, and run it as the Lambda does."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic
from tokenizers import Tokenizer
from transformers import PreTrainedModel, PreTrainedTokenizerFast

ONNX_FILE = "model.int8.onnx"
TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "config.json"
INPUTS = ("input_ids", "attention_mask")


def export_bundle(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    labels: list[str],
    max_length: int,
    out_dir: Path,
    opset: int,
) -> Path:
    """Write ``model.int8.onnx``, ``tokenizer.json`` and ``config.json`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    sample = tokenizer(
        ["an example headline", "a longer example headline for the exporter"], padding=True, return_tensors="pt"
    )
    model = model.eval()
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "model.onnx"
        with torch.no_grad():
            torch.onnx.export(
                model,
                (sample["input_ids"], sample["attention_mask"]),
                str(fp32),
                input_names=list(INPUTS),
                output_names=["logits"],
                dynamic_axes={name: {0: "batch", 1: "sequence"} for name in INPUTS} | {"logits": {0: "batch"}},
                opset_version=opset,
                dynamo=False,
            )
        quantize_dynamic(fp32, out_dir / ONNX_FILE, weight_type=QuantType.QInt8)
    tokenizer.backend_tokenizer.save(str(out_dir / TOKENIZER_FILE))
    config = {"labels": list(labels), "max_length": max_length, "pad_token": tokenizer.pad_token}
    (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return out_dir


class OnnxClassifier:
    """Runs a serving bundle with onnxruntime and tokenizers, as the Lambda does."""

    def __init__(self, bundle: Path, batch_size: int) -> None:
        config = json.loads((bundle / CONFIG_FILE).read_text())
        self.labels: list[str] = config["labels"]
        self.batch_size = batch_size
        self.tokenizer = Tokenizer.from_file(str(bundle / TOKENIZER_FILE))
        self.tokenizer.enable_truncation(config["max_length"])
        pad = config["pad_token"]
        self.tokenizer.enable_padding(pad_id=self.tokenizer.token_to_id(pad), pad_token=pad)
        self.session = ort.InferenceSession(str(bundle / ONNX_FILE), providers=["CPUExecutionProvider"])

    def logits(self, texts: list[str]) -> np.ndarray:
        out = []
        for start in range(0, len(texts), self.batch_size):
            encoded = self.tokenizer.encode_batch(texts[start : start + self.batch_size])
            feed = {
                "input_ids": np.array([e.ids for e in encoded], dtype=np.int64),
                "attention_mask": np.array([e.attention_mask for e in encoded], dtype=np.int64),
            }
            out.append(self.session.run(["logits"], feed)[0])
        return np.concatenate(out)


def onnx_logits(bundle: Path, texts: list[str], batch_size: int) -> np.ndarray:
    """Logits of the bundle's int8 model for ``texts``."""
    return OnnxClassifier(bundle, batch_size).logits(texts)
