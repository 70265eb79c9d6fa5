"""What any registered model must answer: one row per text, a known class, and four probabilities that agree."""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd

TEXTS = [
    "Apple reported strong quarterly earnings with iPhone sales up 15%",
    "The Red Sox beat the Yankees 5-3 to win the pennant",
    "Rebels seized the capital as the president fled the country",
    "NASA's new telescope captured images of a distant galaxy",
]


def test_answers_each_text_with_a_class_and_probabilities(model: mlflow.pyfunc.PyFuncModel, labels: list[str]) -> None:
    out = model.predict(pd.DataFrame({"text": TEXTS}))
    assert out.columns.tolist() == ["predicted_class", "confidence", *labels]
    assert len(out) == len(TEXTS)
    probs = out[labels].to_numpy()
    assert np.allclose(probs.sum(axis=1), 1, atol=1e-5) and (probs >= 0).all()
    assert out.predicted_class.tolist() == [labels[i] for i in probs.argmax(axis=1)]
    assert np.allclose(out.confidence, probs.max(axis=1))


def test_a_list_and_a_text_column_give_the_same_answer(model: mlflow.pyfunc.PyFuncModel) -> None:
    pd.testing.assert_frame_equal(model.predict(TEXTS), model.predict(pd.DataFrame({"text": TEXTS})))
