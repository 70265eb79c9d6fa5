"""The test set's identity: which rows of the test file a run scored (``dataset.test.rows_sha256``), and the gate
that compares a candidate with the champion only on the same rows, old versions without that tag included."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from agnews.config import compose
from agnews.data import by_length, parse_file, rows_sha256, stratified_sample
from agnews.names import TEST_ROWS_TAG
from agnews.promotion.gate import TestSet, gate

FILE = "a" * 64
GATE = ["registry.min_accuracy=0.5", "registry.min_behaviour_pass_rate=0", "registry.tolerance=0.01"]


@pytest.fixture(scope="module")
def test_split(agnews_dir: Path) -> pd.DataFrame:
    """The real AG News test split, indexed by line number as ``read_split`` reads it."""
    return parse_file(agnews_dir / "test.csv", 4)


def scored(split: pd.DataFrame, size: int | None, seed: int) -> pd.DataFrame:
    """The test rows a train run scores, in the order it scores them."""
    return by_length(stratified_sample(split, size, seed, "data.test_size"))


def test_the_rows_scored_are_named_by_their_line_numbers(test_split: pd.DataFrame) -> None:
    """Two seeds draw different samples of the same size from the same file; the digest tells them apart, and names
    the rows themselves, whatever order they were drawn or scored in."""
    seed_7, seed_8 = scored(test_split, 1000, 7), scored(test_split, 1000, 8)
    assert rows_sha256(seed_7.index) != rows_sha256(seed_8.index)
    assert rows_sha256(seed_7.index) == rows_sha256(stratified_sample(test_split, 1000, 7, "data.test_size").index)
    assert rows_sha256(seed_7.index) == rows_sha256(scored(test_split, 1000, 7).index)
    assert seed_7.text.equals(test_split.text.loc[seed_7.index])  # the index is the row's line in the file
    assert len(seed_7.index.intersection(seed_8.index)) < 1000
    assert rows_sha256(scored(test_split, None, 7).index) == rows_sha256(range(len(test_split)))


def test_runs_on_different_samples_are_not_comparable() -> None:
    registry = compose(GATE).registry
    sample_7 = TestSet.of(
        {"dataset.test.sha256": FILE, "dataset.test.rows": "1000", TEST_ROWS_TAG: rows_sha256(range(0, 2000, 2))}
    )
    sample_8 = TestSet(FILE, 1000, rows_sha256(range(1, 2000, 2)))
    assert sample_7 == TestSet(FILE, 1000, rows_sha256(range(0, 2000, 2))) != sample_8
    passed, reason = gate(registry, 0.9, 1.0, 3, 0.8, sample_8, sample_7)
    assert not passed and reason == (
        "rejected by the production gate: not comparable: it was evaluated on test set sha256 aaaaaaaaaaaa, 1000 "
        f"rows (rows sha256 {sample_8.rows_sha256[:12]}), champion v3 on test set sha256 aaaaaaaaaaaa, 1000 rows "
        f"(rows sha256 {sample_7.rows_sha256[:12]})"
    )
    assert gate(registry, 0.9, 1.0, 3, 0.8, sample_7, sample_7)[0]


def test_a_champion_tagged_before_the_rows_digest_stands_for_the_whole_file() -> None:
    """A version with only the file's sha256 and its row count was scored, as far as anyone can tell, on every row
    of that file: a candidate that scored every row is compared with it as before; one that scored a sample of the
    same size is not, since nothing says the champion scored those rows."""
    registry = compose(GATE).registry
    old_champion = TestSet.of({"dataset.test.sha256": FILE, "dataset.test.rows": "7600"})
    assert old_champion is not None and old_champion.rows_sha256 is None
    whole_file = TestSet(FILE, 7600, rows_sha256(range(7600)))
    assert whole_file == old_champion
    passed, reason = gate(registry, 0.905, 1.0, 3, 0.91, whole_file, old_champion)
    assert passed and reason.endswith(f"the same {whole_file} as champion v3")
    assert not gate(registry, 0.89, 1.0, 3, 0.91, whole_file, old_champion)[0]  # below the champion's 0.91 - 0.01

    old_sample_champion = TestSet(FILE, 1000)  # an old run with data.test_size=1000: its rows are unknown
    sample = TestSet(FILE, 1000, rows_sha256(range(0, 2000, 2)))
    passed, reason = gate(registry, 0.95, 1.0, 3, 0.91, sample, old_sample_champion)
    assert not passed and "not comparable: it was evaluated on" in reason
    assert TestSet(FILE, 1000) == old_sample_champion  # two old versions compare as they always did
