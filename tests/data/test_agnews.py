"""Invariants of the AG News copy (see ../shared/data/ag_news/SOURCES.md) and of what the upload step writes."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from agnews.data import INFO, parse_file, read_info, read_split
from agnews.storage import open_storage
from agnews.upload import upload
from bundle.layout import sha256
from tests.helpers import LABELS


@pytest.fixture(scope="module")
def splits(agnews_dir: Path) -> dict[str, pd.DataFrame]:
    return {split: parse_file(agnews_dir / f"{split}.csv", len(LABELS)) for split in ("train", "test")}


def normalized(texts: pd.Series) -> set[str]:
    return {" ".join(text.lower().split()) for text in texts}


def test_row_counts(splits: dict[str, pd.DataFrame]) -> None:
    assert {split: len(frame) for split, frame in splits.items()} == {"train": 22260, "test": 7600}


def test_class_balance(splits: dict[str, pd.DataFrame]) -> None:
    assert splits["test"].label.value_counts().sort_index().tolist() == [1900] * 4
    train_share = splits["train"].label.value_counts(normalize=True).sort_index()
    assert train_share.index.tolist() == [0, 1, 2, 3]
    assert train_share.between(0.24, 0.26).all(), train_share.tolist()  # measured: 0.244 to 0.259


def test_no_empty_or_blank_texts(splits: dict[str, pd.DataFrame]) -> None:
    for split, frame in splits.items():
        assert frame.text.str.strip().str.len().min() > 0, split


def test_train_and_test_texts_barely_overlap(splits: dict[str, pd.DataFrame]) -> None:
    """Measured: no test text is in train as is, one after folding case and white space, two train duplicates."""
    train, test = splits["train"].text, splits["test"].text
    assert not set(train) & set(test)
    assert len(normalized(train) & normalized(test)) <= 1
    assert train.duplicated().sum() <= 2 and not test.duplicated().any()


@pytest.fixture(scope="module")
def uploaded(agnews_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    from agnews.config import compose

    root = tmp_path_factory.mktemp("upload")
    cfg = compose([f"storage.uri={root / 'store'}", f"data.source={agnews_dir}"])
    upload(cfg.data, cfg.storage)
    return open_storage(cfg.storage), cfg.storage.dataset_prefix


def test_upload_writes_the_rows_it_read(splits: dict[str, pd.DataFrame], uploaded) -> None:
    storage, prefix = uploaded
    info = read_info(storage, prefix)
    assert info["labels"] == LABELS
    for split, frame in splits.items():
        stored = read_split(storage, prefix, split)
        pd.testing.assert_frame_equal(stored, frame, check_dtype=False)
        counts = info["counts"][split]
        assert counts["rows"] == len(frame)
        assert list(counts["per_class"].values()) == frame.label.value_counts().sort_index().tolist()
        data = storage.read_bytes(f"{prefix}/{split}.jsonl")
        assert info["files"][f"{split}.jsonl"] == {"sha256": sha256(data), "bytes": len(data)}
    assert sorted(storage.list(prefix)) == sorted(f"{prefix}/{name}" for name in ("train.jsonl", "test.jsonl", INFO))
