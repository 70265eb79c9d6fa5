"""Serving-bundle inference with ONNX Runtime and a `tokenizers` fast tokenizer: no torch, no transformers.

The one implementation of bundle inference: the Lambda serves with it, and the pipeline checks the int8 bundle
against the torch model with it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import onnxruntime as ort
from tokenizers import Encoding, Tokenizer

from bundle.layout import CONFIG_FILE, INPUTS, ONNX_FILE, OUTPUT, TOKENIZER_FILE, parse_config

# A long text is cut before it is tokenized, in characters per token that the model reads. Real text needs about
# 4.5 (AG News: 236 characters, 53 tokens), so the first cut, 8 per token, almost always holds every token the model
# reads; the cut never goes past 32 per token, whatever the text.
FIRST_CUT_CHARS_PER_TOKEN = 8
MOST_CHARS_PER_TOKEN = 32
# cgroup v2's CPU quota of this process's group ("<quota> <period>" in microseconds, or "max <period>"): Lambda and
# containers cap CPU time there while affinity still shows every core of the host.
CPU_MAX = Path("/sys/fs/cgroup/cpu.max")
SPINNING = "session.intra_op.allow_spinning"


class Reading(NamedTuple):
    """What the model read of one text: its tokens (special tokens left out), and whether that was less than the
    whole text."""

    tokens: int
    cut: bool


def cpu_quota(cpu_max: str | None) -> float | None:
    """The CPUs that a cgroup v2 ``cpu.max`` line allows (``"50000 100000"``: half a CPU); None without a quota, or
    for a line that is not one."""
    quota, _, period = (cpu_max or "").strip().partition(" ")
    try:
        return int(quota) / int(period)
    except ValueError:  # "max", or no file
        return None


def usable_cpus(affinity: int, quota: float | None) -> int:
    """The CPUs this process can keep busy: those it may run on, no more than the quota's whole CPUs, at least one."""
    return max(1, min(affinity, int(quota)) if quota is not None else affinity)


def session_options(affinity: int, cpu_max: str | None) -> ort.SessionOptions:
    """onnxruntime's options for a process that may run on ``affinity`` CPUs under the cgroup quota ``cpu_max``: an
    intra-op pool of ``usable_cpus`` threads (onnxruntime's default sizes it from the host's cores), which spin
    while they wait only when they have CPUs of their own (with one CPU, or under a quota, a spinning thread takes
    the time the work needs)."""
    quota = cpu_quota(cpu_max)
    threads = usable_cpus(affinity, quota)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry(SPINNING, "1" if threads > 1 and quota is None else "0")
    return options


def this_process_options() -> ort.SessionOptions:
    """``session_options`` for the CPUs this process may use now (its affinity) and its cgroup's quota."""
    try:
        cpu_max = CPU_MAX.read_text()
    except OSError:
        cpu_max = None
    return session_options(len(os.sched_getaffinity(0)), cpu_max)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, shifted by the row maximum for stability."""
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


class Predictor:
    """A serving bundle (``model.int8.onnx``, ``tokenizer.json``, ``config.json``) ready to classify texts, with
    ``options`` for its onnxruntime session (default: ``this_process_options()``)."""

    def __init__(self, bundle: Path, options: ort.SessionOptions | None = None) -> None:
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
        self.session = ort.InferenceSession(
            str(bundle / ONNX_FILE), options or this_process_options(), providers=["CPUExecutionProvider"]
        )
        self.special_tokens = self.tokenizer.num_special_tokens_to_add(False)
        self.read_tokens = config.max_length - self.special_tokens  # of the text
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

    def batches(self, texts: list[str]) -> list[tuple[np.ndarray, dict[str, np.ndarray]]]:
        """The model's inputs for ``texts`` (already cut), ``batch_size`` texts at a time in order of length, each with
        the rows of ``texts`` it holds: so that each batch pads to texts of about its own length (on a CPU, padding
        costs far more than batching saves)."""
        return [(rows, inputs) for rows, inputs, _ in self._encoded(texts)]

    def _encoded(self, texts: list[str]) -> list[tuple[np.ndarray, dict[str, np.ndarray], list[Encoding]]]:
        """``batches``, each with its encodings."""
        order = np.argsort([len(text) for text in texts], kind="stable")
        batches = []
        for start in range(0, len(texts), self.batch_size):
            rows = order[start : start + self.batch_size]
            encoded = self.tokenizer.encode_batch([texts[i] for i in rows])
            ids = np.array([e.ids for e in encoded], dtype=np.int64)
            mask = np.array([e.attention_mask for e in encoded], dtype=np.int64)
            batches.append((rows, dict(zip(INPUTS, (ids, mask), strict=True)), encoded))
        return batches

    def run(self, batches: list[tuple[np.ndarray, dict[str, np.ndarray]]]) -> np.ndarray:
        """The logits of ``batches``, shape [texts, labels], each row where ``batches`` puts it."""
        logits = np.empty((sum(len(rows) for rows, _ in batches), len(self.labels)), dtype=np.float32)
        for rows, inputs in batches:
            out = self.session.run([OUTPUT], inputs)[0]
            if out.shape[1] != len(self.labels):
                raise ValueError(f"the model gives {out.shape[1]} logits for {len(self.labels)} labels")
            logits[rows] = out
        return logits

    def logits(self, texts: list[str]) -> np.ndarray:
        """Logits, shape [len(texts), len(labels)], in the order of ``texts``: each text cut to what the model reads
        of it (``cut``), then run in ``batches``."""
        return self.run(self.batches([self.cut(text) for text in texts]))

    def results(self, logits: np.ndarray) -> list[dict[str, Any]]:
        """One ``{"predicted_class", "confidence", "probabilities"}`` per row of ``logits``."""
        results = []
        for row in softmax(logits):
            best = int(row.argmax())
            results.append(
                {
                    "predicted_class": self.labels[best],
                    "confidence": float(row[best]),
                    "probabilities": {label: float(p) for label, p in zip(self.labels, row, strict=True)},
                }
            )
        return results

    def predict(self, texts: list[str]) -> list[dict[str, Any]]:
        """One ``{"predicted_class", "confidence", "probabilities"}`` per text."""
        return self.results(self.logits(texts))

    def predict_read(self, texts: list[str]) -> tuple[list[dict[str, Any]], list[Reading]]:
        """``predict``'s answers, and what the model read of each text."""
        cut = [self.cut(text) for text in texts]
        encoded = self._encoded(cut)
        logits = self.run([(rows, inputs) for rows, inputs, _ in encoded])
        readings: list[Reading] = [Reading(0, False)] * len(texts)
        for rows, _, encodings in encoded:
            for row, encoding in zip(rows, encodings, strict=True):
                tokens = sum(encoding.attention_mask) - self.special_tokens
                readings[row] = Reading(tokens, len(cut[row]) < len(texts[row]) or bool(encoding.overflowing))
        return self.results(logits), readings
