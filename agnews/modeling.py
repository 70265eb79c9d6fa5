"""Tokenizer and model loading: a local folder, a Hub id, or a random init from config."""

from __future__ import annotations

import logging
from pathlib import Path

import requests
from huggingface_hub import constants
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from agnews.errors import ModelError
from agnews.settings import ModelSettings

log = logging.getLogger(__name__)
# The classification heads that AutoModelForSequenceClassification adds on top of a pretrained encoder.
HEAD_MODULES = ("classifier", "pre_classifier", "score")


def _hub_reachable(timeout_s: float) -> bool:
    try:
        requests.head(constants.ENDPOINT, timeout=timeout_s)
    except requests.RequestException:
        return False
    return True


def _from_pretrained(loader, name: str, timeout_s: float, **kwargs):
    """Load from a folder, or from the Hub with a quick reachability check instead of minutes of retries."""
    local = Path(name).expanduser()
    if local.is_dir():
        return loader.from_pretrained(str(local), **kwargs)
    if local.exists() or name.startswith((".", "/", "~")):
        raise ModelError(f"'{name}' is not a model folder")
    online = _hub_reachable(timeout_s)
    try:
        return loader.from_pretrained(name, local_files_only=not online, **kwargs)
    except OSError as exc:
        if not online:
            raise ModelError(
                f"cannot load '{name}': the Hugging Face Hub ({constants.ENDPOINT}) is unreachable and the model "
                "is not cached; use a local folder, or model=minilm (packaged) for offline runs"
            ) from None
        raise ModelError(f"cannot load '{name}' from the Hugging Face Hub: {str(exc).splitlines()[0]}") from None


def load_tokenizer(model: ModelSettings) -> PreTrainedTokenizerFast:
    return _from_pretrained(AutoTokenizer, str(model.tokenizer), model.hub_timeout_s)


def _errors_only(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


def load_model(model: ModelSettings, labels: list[str], tokenizer: PreTrainedTokenizerFast) -> PreTrainedModel:
    """A sequence classifier with a fresh head for ``labels``; random weights when ``model.init`` is set."""
    label_maps = {
        "num_labels": len(labels),
        "id2label": dict(enumerate(labels)),
        "label2id": {name: i for i, name in enumerate(labels)},
    }
    if model.init is not None:
        init = dict(model.init)
        config = AutoConfig.for_model(
            init.pop("model_type"),
            vocab_size=tokenizer.vocab_size,
            pad_token_id=tokenizer.pad_token_id,
            **init,
            **label_maps,
        )
        return AutoModelForSequenceClassification.from_config(config)
    # transformers prints a LOAD REPORT table for the new head's missing weights, expected when fine-tuning: it is
    # read here instead, and only what a user should act on (other missing weights) stays a warning. A filter drops
    # the table, not a level: transformers takes a level of WARNING or above on this logger as its cue to check the
    # model's tensor-parallel plan, and logs a one-line list of every layer "not sharded" (1,100 characters).
    report_logger = logging.getLogger("transformers.modeling_utils")
    report_logger.addFilter(_errors_only)
    try:
        loaded, info = _from_pretrained(
            AutoModelForSequenceClassification,
            str(model.name),
            model.hub_timeout_s,
            output_loading_info=True,
            **label_maps,
        )
    finally:
        report_logger.removeFilter(_errors_only)
    head = [key for key in info["missing_keys"] if key.split(".")[0] in HEAD_MODULES]
    others = sorted(set(info["missing_keys"]) - set(head))
    if head:
        log.info("new classification head initialised (%s): expected when fine-tuning", ", ".join(sorted(head)))
    if info["unexpected_keys"]:
        log.info("%d checkpoint weights not used by the classifier (a pretraining head)", len(info["unexpected_keys"]))
    if others:
        log.warning("weights missing from %s and initialised at random: %s", model.name, ", ".join(others))
    return loaded
