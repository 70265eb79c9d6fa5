"""The MLflow pyfunc: the fine-tuned torch model, returning all four class probabilities.

Logged as models-from-code: MLflow stores this file with the model (and the ``bundle`` package as a code path)
and loads it in any process. The names of the logged model and its two artifacts have their one home here;
torch and transformers are imported when a model is loaded, so that reading those names stays light.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel, PythonModelContext

from bundle.layout import CONFIG_FILE, parse_config

LOGGED_MODEL = "model"  # the name the train step logs the pyfunc under
WEIGHTS_ARTIFACT = "model"  # the safetensors model and its tokenizer
BUNDLE_ARTIFACT = "serving"  # the ONNX int8 serving bundle
BUNDLE_PATH = f"artifacts/{BUNDLE_ARTIFACT}"  # the bundle's folder inside the logged model


class NewsClassifier(PythonModel):
    """``predict`` takes a DataFrame with a ``text`` column (or a list of strings) and returns
    ``predicted_class``, ``confidence`` and one probability column per class."""

    # MLflow would read type hints on `predict` as the signature, and without them it warns on every import, log and
    # load that it could: the signature is logged explicitly, so its type-hint validation is switched off.
    _skip_type_hint_validation = True

    def load_context(self, context: PythonModelContext) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        weights = context.artifacts[WEIGHTS_ARTIFACT]
        self.tokenizer = AutoTokenizer.from_pretrained(weights)
        self.model = AutoModelForSequenceClassification.from_pretrained(weights).eval()
        serving = parse_config((Path(context.artifacts[BUNDLE_ARTIFACT]) / CONFIG_FILE).read_bytes())
        self.labels = serving.labels
        self.max_length = serving.max_length
        self.batch_size: int = context.model_config["batch_size"]

    # No annotations here: MLflow would read them as a type-hint signature; the logged signature rules.
    def predict(self, context, model_input, params=None):
        import torch

        if isinstance(model_input, pd.DataFrame):  # a `text` column, or the one unnamed column of a list input
            model_input = model_input["text"] if "text" in model_input else model_input.iloc[:, 0]
        texts = [str(text) for text in model_input]
        probs = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                batch = self.tokenizer(
                    texts[start : start + self.batch_size],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                )
                probs.append(self.model(**batch).logits.softmax(-1))
        p = torch.cat(probs).numpy() if probs else torch.empty(0, len(self.labels)).numpy()
        frame = pd.DataFrame({"predicted_class": [self.labels[i] for i in p.argmax(1)], "confidence": p.max(1)})
        return frame.join(pd.DataFrame(p, columns=self.labels))


mlflow.models.set_model(NewsClassifier())
