"""Evaluation metrics and the plots and reports logged with a train run."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from sklearn.metrics import (
    ConfusionMatrixDisplay,
    accuracy_score,
    classification_report,
    f1_score,
    precision_recall_fscore_support,
)


def slug(label: str) -> str:
    """A metric-name-safe form of a class name: 'Sci/Tech' -> 'sci_tech'."""
    return re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")


def classification_metrics(labels: list[str], y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """Accuracy, macro-F1, and precision, recall and F1 per class."""
    classes = list(range(len(labels)))
    precision, recall, f1, _ = precision_recall_fscore_support(y_true, y_pred, labels=classes, zero_division=0)
    metrics = {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "f1_macro": float(f1_score(y_true, y_pred, labels=classes, average="macro", zero_division=0)),
    }
    for i, name in enumerate(labels):
        metrics |= {
            f"precision_{slug(name)}": float(precision[i]),
            f"recall_{slug(name)}": float(recall[i]),
            f"f1_{slug(name)}": float(f1[i]),
        }
    return metrics


def report(labels: list[str], y_true: np.ndarray, y_pred: np.ndarray) -> dict:
    return classification_report(
        y_true, y_pred, labels=list(range(len(labels))), target_names=labels, output_dict=True, zero_division=0
    )


def confusion_figure(labels: list[str], y_true: np.ndarray, y_pred: np.ndarray) -> Figure:
    fig = Figure(figsize=(6, 5))
    ax = fig.subplots()
    ConfusionMatrixDisplay.from_predictions(
        y_true, y_pred, labels=list(range(len(labels))), display_labels=labels, ax=ax, cmap="Blues", colorbar=False
    )
    ax.set_title("Confusion matrix (test split)")
    fig.tight_layout()
    return fig


def misclassified(
    labels: list[str], texts: list[str], y_true: np.ndarray, probs: np.ndarray, limit: int
) -> pd.DataFrame:
    """The most confident mistakes first."""
    y_pred = probs.argmax(axis=1)
    wrong = np.flatnonzero(y_pred != y_true)
    wrong = wrong[np.argsort(-probs[wrong, y_pred[wrong]])][:limit]
    return pd.DataFrame(
        {
            "text": [texts[i] for i in wrong],
            "label": [labels[y_true[i]] for i in wrong],
            "predicted": [labels[y_pred[i]] for i in wrong],
            "confidence": probs[wrong, y_pred[wrong]].round(4),
        }
    )
