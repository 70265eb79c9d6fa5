"""Drift of a version's captured answers from its reference, by Evidently's data drift preset.

The answers are compared on the columns that every capture holds (``reference.COLUMNS``); where the Lambda kept the
texts (``CAPTURE_TEXT=true``), a sample of them is compared with the reference's texts on Evidently's text
descriptors. Evidently picks each column's test by its type and the sample's size (Kolmogorov-Smirnov or
chi-squared up to 1,000 reference rows, Wasserstein or Jensen-Shannon distance above) and decides, with its own
threshold, whether the column drifted.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import pandas.core.dtypes.common

from agnews.monitoring.reference import COLUMNS, CUT, PREDICTED, TEXT

# Evidently 0.7.23 (the newest release) imports a helper that pandas 3 removed, for a legacy data-type test that
# this module never runs; the name is put back, as a function that says so, so that Evidently imports at all.
if not hasattr(pandas.core.dtypes.common, "infer_dtype_from_object"):

    def _removed_in_pandas_3(dtype: Any) -> Any:
        raise NotImplementedError("pandas 3 has no infer_dtype_from_object")

    pandas.core.dtypes.common.infer_dtype_from_object = _removed_in_pandas_3  # type: ignore[attr-defined]

from evidently import DataDefinition, Dataset, Report
from evidently.descriptors import NonLetterCharacterPercentage, TextLength, WordCount
from evidently.presets import DataDriftPreset

DESCRIPTORS = ("text length", "words", "non-letter share")  # the descriptors' columns, compared where text was kept


@dataclass
class Drift:
    """One version's drift: each column's score (by ``methods``) and whether it drifted, and the reports' HTML."""

    scores: dict[str, float] = field(default_factory=dict)
    methods: dict[str, str] = field(default_factory=dict)
    drifted: list[str] = field(default_factory=list)
    html: dict[str, str] = field(default_factory=dict)  # report name: its HTML

    @property
    def share(self) -> float:
        """The share of the compared columns that drifted."""
        return len(self.drifted) / len(self.scores) if self.scores else 0.0


def _compare(
    current: Dataset, reference: Dataset, columns: list[str], drift_share: float, name: str, out: Drift
) -> None:
    """Run the preset on ``columns``, adding each column's score and verdict and the report's HTML to ``out``."""
    report = Report([DataDriftPreset(columns=columns, drift_share=drift_share)], include_tests=True)
    with warnings.catch_warnings():  # numpy's divide warnings on constant columns, which Evidently handles
        warnings.simplefilter("ignore", RuntimeWarning)
        snapshot = report.run(current, reference)
    result = snapshot.dict()
    for metric in result["metrics"]:
        config = metric["config"]
        if config.get("type", "").endswith(":ValueDrift"):
            out.scores[config["column"]] = float(metric["value"])
            out.methods[config["column"]] = str(config.get("method"))
    for test in result["tests"]:
        params = test["metric_config"]["params"]
        if params.get("type", "").endswith(":ValueDrift") and str(test["status"].value) == "FAIL":
            out.drifted.append(params["column"])
    out.html[name] = snapshot.get_html_str(as_iframe=False)


def drift(reference: pd.DataFrame, current: pd.DataFrame, texts: list[str] | None, drift_share: float) -> Drift:
    """``current`` (the captured answers, ``reference.COLUMNS``) against ``reference``; with ``texts`` (a sample of
    the captured texts), their descriptors against the reference's texts too."""
    answers = DataDefinition(
        categorical_columns=[PREDICTED, CUT], numerical_columns=[c for c in COLUMNS if c not in (PREDICTED, CUT)]
    )
    out = Drift()
    columns = list(COLUMNS)
    _compare(
        Dataset.from_pandas(current[columns], data_definition=answers),
        Dataset.from_pandas(reference[columns], data_definition=answers),
        columns,
        drift_share,
        "answers",
        out,
    )
    if texts:
        described = DataDefinition(text_columns=[TEXT])
        descriptors = [
            TextLength(TEXT, alias=DESCRIPTORS[0]),
            WordCount(TEXT, alias=DESCRIPTORS[1]),
            NonLetterCharacterPercentage(TEXT, alias=DESCRIPTORS[2]),
        ]
        _compare(
            Dataset.from_pandas(pd.DataFrame({TEXT: texts}), data_definition=described, descriptors=descriptors),
            Dataset.from_pandas(reference[[TEXT]], data_definition=described, descriptors=descriptors),
            list(DESCRIPTORS),
            drift_share,
            "texts",
            out,
        )
    return out
