"""Behavioural checks, as in CheckList: minimum functionality, invariance and directional expectations.

The cases are data (``behaviour.json`` beside this module). ``check`` runs them through any function that gives
class probabilities for texts (the torch model, the int8 bundle, a registered pyfunc) and returns the pass rate of
each kind, the overall pass rate, and a table of the failures.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import pandas as pd

SUITE_FILE = Path(__file__).with_name("behaviour.json")
KINDS = ("minimum_functionality", "invariance", "directional")

Probabilities = Callable[[list[str]], np.ndarray]  # texts -> [len(texts), classes], in label order


@cache
def suite() -> dict:
    return json.loads(SUITE_FILE.read_text(encoding="utf-8"))


@dataclass(frozen=True)
class Behaviour:
    """Pass rates by kind (``minimum_functionality``, ...) and ``overall``; one row per failed case."""

    pass_rates: dict[str, float]
    failures: pd.DataFrame

    def metrics(self, prefix: str) -> dict[str, float]:
        """MLflow metric names: ``<prefix>_pass_rate`` (overall) and ``<prefix>_<kind>_pass_rate``."""
        return {
            f"{prefix}_pass_rate" if kind == "overall" else f"{prefix}_{kind}_pass_rate": rate
            for kind, rate in self.pass_rates.items()
        }


def _variants(case: dict) -> list[str]:
    names = list(case["fills"])
    return [
        case["template"].format(**dict(zip(names, values, strict=True)))
        for values in itertools.product(*(case["fills"][name] for name in names))
    ]


def check(probabilities: Probabilities, labels: list[str]) -> Behaviour:
    """Run every case; a case passes when its expectation holds for the model's probabilities."""
    cases = suite()
    failures: list[dict] = []
    passed: dict[str, list[bool]] = {kind: [] for kind in KINDS}

    mft = [(text, label) for label, texts in cases["minimum_functionality"].items() for text in texts]
    predicted = probabilities([text for text, _ in mft]).argmax(1)
    for (text, label), index in zip(mft, predicted, strict=True):
        ok = labels[index] == label
        passed["minimum_functionality"].append(ok)
        if not ok:
            failures.append({"kind": "minimum_functionality", "text": text, "expected": label, "got": labels[index]})

    for case in cases["invariance"]:
        texts = _variants(case)
        predicted = [labels[i] for i in probabilities(texts).argmax(1)]
        ok = len(set(predicted)) == 1
        passed["invariance"].append(ok)
        if not ok:
            got = ", ".join(f"{text!r}: {label}" for text, label in zip(texts, predicted, strict=True))
            failures.append({"kind": "invariance", "text": case["template"], "expected": "one class", "got": got})

    for case in cases["directional"]:
        before, after = probabilities([case["text"], case["text"] + case["add"]])[:, labels.index(case["class"])]
        ok = bool(after > before)
        passed["directional"].append(ok)
        if not ok:
            failures.append(
                {
                    "kind": "directional",
                    "text": case["text"] + case["add"],
                    "expected": f"P({case['class']}) up from {before:.3f}",
                    "got": f"{after:.3f}",
                }
            )

    every = [ok for results in passed.values() for ok in results]
    rates = {kind: float(np.mean(results)) for kind, results in passed.items()} | {"overall": float(np.mean(every))}
    return Behaviour(rates, pd.DataFrame(failures, columns=["kind", "text", "expected", "got"]))
