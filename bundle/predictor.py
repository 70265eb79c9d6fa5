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

# A long text is cut before it is tokenized, in characters per token that the model reads. Real text needs about
# 4.5 (AG News: 236 characters, 53 tokens), so the first cut, 8 per token, almost always holds every token the model
# reads; the cut never goes past 32 per token, whatever the text.
FIRST_CUT_CHARS_PER_TOKEN = 8
MOST_CHARS_PER_TOKEN = 32


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
        self.read_tokens = config.max_length - self.tokenizer.num_special_tokens_to_add(False)  # of the text
        self.first_cut = config.max_length * FIRST_CUT_CHARS_PER_TOKEN
        self.most_chars = config.max_length * MOST_CHARS_PER_TOKEN

    def cut(self, text: str) -> str:
        """What the model reads of ``text``: a prefix of at most ``most_chars`` characters, read exactly as ``text``
        is read wherever one exists; ``text`` itself when it is shorter than the prefix would be.

        The model reads the first ``read_tokens`` tokens of a text. A prefix is read the same as the whole text when
        those tokens all come from words before its last word, which the cut may have split. The prefix starts at
        ``first_cut`` characters and doubles until it is read the same, up to ``most_chars``: so a request's work is
        bounded by what the model reads, not by the length of its texts. A text that fits in ``most_chars``
        characters is never changed unless a shorter prefix is read the same; only a text longer than that whose
        first ``most_chars`` characters hold fewer tokens than the model reads (runs of thousands of spaces, or of
        words of a hundred letters, not text) is read differently than it would be whole.
        """
        size = self.first_cut
        while size < len(text):
            head = text[:size]
            if size >= self.most_chars or self._read_as_a_whole(head):
                return head
            size = min(2 * size, self.most_chars)
        return text

    def _read_as_a_whole(self, head: str) -> bool:
        """Whether the tokens that the model reads of ``head`` all lie before its last word."""
        encoding = self.tokenizer.encode(head, add_special_tokens=False)  # truncated: the rest is in overflowing
        if len(encoding.word_ids) < self.read_tokens:
            return False
        last_read = encoding.word_ids[self.read_tokens - 1]
        last = next((w for w in reversed((encoding.overflowing or [encoding])[-1].word_ids) if w is not None), None)
        return last_read is not None and last is not None and last > last_read

    def logits(self, texts: list[str]) -> np.ndarray:
        """Logits, shape [len(texts), len(labels)], in the order of ``texts``.

        Each text is first cut to what the model reads of it (``cut``). The texts run ``batch_size`` at a time in
        order of length, so that each batch pads to texts of about its own length: on a CPU, padding costs far more
        than batching saves.
        """
        texts = [self.cut(text) for text in texts]
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
