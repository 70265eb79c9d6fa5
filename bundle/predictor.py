"""Serving-bundle inference with ONNX Runtime and a `tokenizers` fast tokenizer: no torch, no transformers.

The one implementation of bundle inference: the Lambda serves with it, and the pipeline checks the int8 bundle
against the torch model with it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from bundle.layout import CONFIG_FILE, INPUTS, ONNX_FILE, OUTPUT, TOKENIZER_FILE, parse_config


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, shifted by the row maximum for stability."""
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


class Predictor:
    """A serving bundle (``model.int8.onnx``, ``tokenizer.json``, ``config.json``) ready to classify texts."""

    def __init__(self, bundle: Path) -> None:
        config = parse_config((bundle / CONFIG_FILE).read_bytes(), str(bundle / CONFIG_FILE))
        self.labels = config.labels
        self.batch_size = config.batch_size
        self.tokenizer = Tokenizer.from_file(str(bundle / TOKENIZER_FILE))
        self.tokenizer.enable_truncation(config.max_length)
        pad = config.pad_token
        pad_id = self.tokenizer.token_to_id(pad)
        if pad_id is None:
            raise ValueError(f"{bundle / CONFIG_FILE}: pad_token {pad!r} is not in the tokenizer's vocabulary")
        self.tokenizer.enable_padding(pad_id=pad_id, pad_token=pad)
        self.session = ort.InferenceSession(str(bundle / ONNX_FILE), providers=["CPUExecutionProvider"])

    def logits(self, texts: list[str]) -> np.ndarray:
        """Logits, shape [len(texts), len(labels)], in the order of ``texts``.

        The texts run ``batch_size`` at a time in order of length, so that each batch pads to texts of about its own
        length: on a CPU, padding costs far more than batching saves.
        """
        logits = np.empty((len(texts), len(self.labels)), dtype=np.float32)
        order = np.argsort([len(text) for text in texts], kind="stable")
        for start in range(0, len(texts), self.batch_size):
            rows = order[start : start + self.batch_size]
            encoded = self.tokenizer.encode_batch([texts[i] for i in rows])
            ids = np.array([e.ids for e in encoded], dtype=np.int64)
            mask = np.array([e.attention_mask for e in encoded], dtype=np.int64)
            out = self.session.run([OUTPUT], dict(zip(INPUTS, (ids, mask), strict=True)))[0]
            if out.shape[1] != len(self.labels):
                raise ValueError(f"the model gives {out.shape[1]} logits for {len(self.labels)} labels")
            logits[rows] = out
        return logits

    def predict(self, texts: list[str]) -> list[dict[str, Any]]:
        """One ``{"predicted_class", "confidence", "probabilities"}`` per text."""
        results = []
        for row in softmax(self.logits(texts)):
            best = int(row.argmax())
            results.append(
                {
                    "predicted_class": self.labels[best],
                    "confidence": float(row[best]),
                    "probabilities": {label: float(p) for label, p in zip(self.labels, row, strict=True)},
                }
            )
        return results
