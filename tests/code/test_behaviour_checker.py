"""The behavioural checker itself: how cases pass and fail, counted against a scorer whose answers are known."""

from __future__ import annotations

import numpy as np

from agnews.behaviour import _variants, check, suite
from tests.helpers import LABELS

WORDS = {
    0: ("president", "minister", "rebels", "troops", "un ", "border", "protest", "embassy", "hostage", "refugee"),
    1: ("won", "win", "beat", "scored", "goal", "cup", "league", "team", "olympic", "marathon", "game", "coach"),
    2: ("shares", "stock", "profit", "bank", "prices", "earnings", "jobs", "sales", "merger", "investors", "deal"),
    3: ("nasa", "software", "scientists", "internet", "chip", "galaxy", "planet", "species", "genome", "windows"),
}


def keyword_scores(texts: list[str]) -> np.ndarray:
    """Class probabilities from keyword counts: a transparent stand-in for a model."""
    counts = np.array([[sum(w in t.lower() for w in WORDS[c]) for c in range(4)] for t in texts], dtype=float)
    scores = np.exp(counts)
    return scores / scores.sum(axis=1, keepdims=True)


def test_every_case_is_counted_and_rates_match_failures() -> None:
    cases = suite()
    result = check(keyword_scores, LABELS)
    total = {
        "minimum_functionality": sum(len(texts) for texts in cases["minimum_functionality"].values()),
        "invariance": len(cases["invariance"]),
        "directional": len(cases["directional"]),
    }
    assert set(result.pass_rates) == {*total, "overall"}
    for kind, n in total.items():
        failed = int((result.failures.kind == kind).sum())
        assert result.pass_rates[kind] == (n - failed) / n
    assert result.pass_rates["overall"] == 1 - len(result.failures) / sum(total.values())
    assert result.metrics("behaviour")["behaviour_pass_rate"] == result.pass_rates["overall"]
    assert result.metrics("behaviour")["behaviour_directional_pass_rate"] == result.pass_rates["directional"]


def test_a_constant_model_fails_what_it_should() -> None:
    """One class for everything: a quarter of minimum functionality, every invariance, no directional case."""
    result = check(lambda texts: np.tile([0.1, 0.2, 0.6, 0.1], (len(texts), 1)), LABELS)
    assert result.pass_rates["minimum_functionality"] == 0.25
    assert result.pass_rates["invariance"] == 1.0
    assert result.pass_rates["directional"] == 0.0  # the probability never moves up


def test_suite_has_at_least_ten_headlines_per_class_and_real_variations() -> None:
    cases = suite()
    assert {label: len(texts) >= 10 for label, texts in cases["minimum_functionality"].items()} == dict.fromkeys(
        LABELS, True
    )
    for case in cases["invariance"]:
        variants = _variants(case)
        assert len(variants) == len(set(variants)) > 1
    assert {case["class"] for case in cases["directional"]} == {"Sports", "Business"}
