"""Parsing and validation of AG News sources, and the one-line errors for bad input."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest

from agnews.config import compose
from agnews.data import build_info, load_source, parse_csv, parse_file, parse_jsonl, read_split, sha256, to_jsonl
from agnews.errors import DataError
from agnews.settings import Settings
from agnews.storage import LocalStorage
from agnews.upload import upload
from tests.helpers import LABELS

ROWS = [("Oil prices rise", 2), ("Team wins the cup", 1), ("New chip unveiled", 3), ("Talks in Geneva", 0)]

# The original AG News layout: no header, every field quoted, "" for a quote, a backslash for a newline.
CSV = (
    '"3","Oil prices","rise"\n'
    '"2","Team wins","the ""cup"""\n'
    '"4","New chip","unveiled\\today"\n'
    '"1","Talks in","Geneva"\n'
)


def write(path: Path, content: bytes | str | pd.DataFrame) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, pd.DataFrame):
        content.to_parquet(path)
    else:
        path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def jsonl(rows: list[tuple[str, int]]) -> str:
    return "".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows)


def frame(rows: list[tuple[str, int]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["text", "label"])


def records(df: pd.DataFrame) -> list[tuple[str, int]]:
    return list(zip(df.text, df.label.astype(int), strict=True))


def test_csv_original_form(tmp_path: Path) -> None:
    parsed = parse_csv(write(tmp_path / "train.csv", CSV), len(LABELS))
    assert records(parsed) == [
        ("Oil prices rise", 2),
        ('Team wins the "cup"', 1),
        ("New chip unveiled\\today", 3),
        ("Talks in Geneva", 0),
    ]


def test_csv_quoted_newline_and_line_numbers(tmp_path: Path) -> None:
    """A quoted newline stays inside the text, and errors count physical lines; U+2028 is not a line break."""
    path = write(tmp_path / "train.csv", '"1","two\nlines","x\u2028y"\n"9","bad","label"\n')
    with pytest.raises(DataError, match=re.escape(f"{path}:3: label 9 out of range 1-4")):
        parse_csv(path, len(LABELS))
    write(path, '"1","two\r\nlines","x\u2028y"\r\n"2","b","c"\r\n')
    assert records(parse_csv(path, len(LABELS))) == [("two\r\nlines x\u2028y", 0), ("b c", 1)]


def test_jsonl_and_parquet(tmp_path: Path) -> None:
    text = jsonl(ROWS[:2]) + "\n" + jsonl(ROWS[2:])  # a blank line is skipped
    assert records(parse_jsonl(write(tmp_path / "a.jsonl", text), len(LABELS))) == ROWS
    assert records(parse_file(write(tmp_path / "a.parquet", frame(ROWS)), len(LABELS))) == ROWS


def test_jsonl_round_trip_is_canonical(tmp_path: Path) -> None:
    """to_jsonl output parses back to the same rows, byte-identical for the same rows (stable sha256)."""
    rows = [*ROWS, ("Ünïcode \u2028 separator", 1)]
    data = to_jsonl(frame(rows))
    assert data == to_jsonl(frame(rows))
    assert records(parse_jsonl(write(tmp_path / "rt.jsonl", data), len(LABELS))) == rows


def data_cfg(make_cfg, **data: object):
    return make_cfg(*(f"data.{key}={value}" for key, value in data.items())).data


def test_folder_sources(tmp_path: Path, make_cfg) -> None:
    """A folder with train/test in any supported format; other files there are ignored."""
    csv_dir, mixed_dir = tmp_path / "csv", tmp_path / "mixed"
    write(csv_dir / "train.csv", CSV)
    write(csv_dir / "test.csv", CSV)
    write(csv_dir / "README.md", "not data")
    write(csv_dir / "train_row_sources.csv", "index,source\n1,x\n")
    write(mixed_dir / "train.jsonl", jsonl(ROWS))
    write(mixed_dir / "test.parquet", frame(ROWS[:2]))
    splits = load_source(data_cfg(make_cfg, source=csv_dir))
    assert {split: len(df) for split, df in splits.items()} == {"train": 4, "test": 4}
    splits = load_source(data_cfg(make_cfg, source=mixed_dir))
    assert records(splits["train"]) == ROWS
    assert records(splits["test"]) == ROWS[:2]


def test_single_files(tmp_path: Path, make_cfg) -> None:
    train = write(tmp_path / "a" / "mine.jsonl", jsonl(ROWS))
    test = write(tmp_path / "b" / "other.csv", CSV)
    splits = load_source(data_cfg(make_cfg, train_file=train, test_file=test))
    assert records(splits["train"]) == ROWS
    assert records(splits["test"])[0] == ("Oil prices rise", 2)


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ({"train_file": "x.csv"}, "set both data.train_file and data.test_file, or neither"),
        ({"source": "./nowhere"}, "./nowhere: not a folder with train and test files, nor a Hub dataset id"),
        ({"source": "{tmp}"}, "{tmp}: no test file (test.csv or test.jsonl or test.parquet)"),
    ],
    ids=["one-file", "no-folder", "no-test-file"],
)
def test_source_errors(tmp_path: Path, make_cfg, data: dict[str, str], problem: str) -> None:
    write(tmp_path / "train.csv", CSV)
    data = {key: value.format(tmp=tmp_path) for key, value in data.items()}
    with pytest.raises(DataError, match=f"^{re.escape(problem.format(tmp=tmp_path))}$"):
        load_source(data_cfg(make_cfg, **data))


def test_real_agnews_test_split(agnews_dir: Path) -> None:
    test = parse_file(agnews_dir / "test.csv", len(LABELS))
    assert len(test) == 7600
    assert test.label.value_counts().sort_index().tolist() == [1900] * 4
    assert test.text[0].startswith("Fears for T N pension after talks")
    assert LABELS[test.label[0]] == "Business"


def test_build_info(tmp_path: Path) -> None:
    splits = {"train": frame(ROWS), "test": frame(ROWS[:1])}
    files = {f"{split}.jsonl": to_jsonl(df) for split, df in splits.items()}
    info = build_info(splits, files, LABELS, "somewhere", "abc123")
    assert info["labels"] == LABELS
    assert info["counts"]["train"] == {"rows": 4, "per_class": dict.fromkeys(LABELS, 1)}
    assert info["counts"]["test"]["per_class"] == {"World": 0, "Sports": 0, "Business": 1, "Sci/Tech": 0}
    assert info["files"]["train.jsonl"] == {"sha256": sha256(files["train.jsonl"]), "bytes": len(files["train.jsonl"])}
    assert (info["source"], info["code_version"]) == ("somewhere", "abc123")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", info["created_at"])


# (file name, content, line or None, problem): every bad input the upload step must refuse.
BAD_INPUTS = {
    "missing-file": ("train.csv", None, None, "no such file"),
    "csv-columns": ("train.csv", '"1","a","b"\n"2","only a title"\n', 2, "expected 3 columns"),
    "csv-header": ("train.csv", '"class","title","description"\n' + CSV, 1, "a header row, but AG News CSV has none"),
    "csv-class-not-number": ("train.csv", CSV + '"x","a","b"\n', 5, "class 'x' is not a number"),
    "csv-label-high": ("train.csv", CSV + '"5","a","b"\n', 5, "label 5 out of range 1-4"),
    "csv-label-zero": ("train.csv", '"0","a","b"\n', 1, "label 0 out of range 1-4"),
    "csv-empty-text": ("train.csv", '"1","a","b"\n"2"," ",""\n', 2, "empty text"),
    "csv-not-utf8": ("train.csv", b'"1","a","b"\n"2","caf\xe9","b"\n', 2, "bytes are not UTF-8"),
    "csv-empty-file": ("train.csv", b"", None, "empty file"),
    "csv-blank-file": ("train.csv", "\n\n", None, "empty file"),
    "jsonl-keys": ("train.jsonl", '{"text": "a", "class": 1}\n', 1, "expected keys ['label', 'text'], found"),
    "jsonl-header": ("train.jsonl", '"text","label"\n' + jsonl(ROWS), 1, "invalid JSON"),
    "jsonl-label": ("train.jsonl", jsonl(ROWS) + jsonl([("a", 4)]), 5, "label 4 out of range 0-3"),
    "jsonl-label-null": ("train.jsonl", '{"text": "a", "label": null}\n', 1, "missing label"),
    "jsonl-empty-text": ("train.jsonl", jsonl([("a", 0), ("", 1)]), 2, "empty text"),
    "jsonl-not-utf8": ("train.jsonl", b'{"text": "\xff", "label": 0}\n', 1, "bytes are not UTF-8"),
    "jsonl-empty-file": ("train.jsonl", b"", None, "empty file"),
    "parquet-columns": ("train.parquet", pd.DataFrame({"text": ["a"], "y": [0]}), None, "expected columns"),
    "parquet-label": ("train.parquet", frame([("a", 0), ("b", -1)]), 2, "label -1 out of range 0-3"),
    "parquet-label-null": ("train.parquet", pd.DataFrame({"text": ["a", "b"], "label": [0, None]}), 2, "missing label"),
    "parquet-empty-text": ("train.parquet", pd.DataFrame({"text": ["a", None], "label": [0, 1]}), 2, "empty text"),
    "parquet-empty-file": ("train.parquet", frame([]), None, "empty file"),
}


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> tuple[Settings, Path]:
    """A store that already holds a dataset, and the config that uploaded it."""
    root = tmp_path_factory.mktemp("stored")
    write(root / "good" / "train.csv", CSV)
    write(root / "good" / "test.jsonl", jsonl(ROWS))
    cfg = compose(
        [
            f"data.source={root / 'good'}",
            f"storage.uri={root / 'store'}",
            f"tracking.uri=sqlite:///{root / 'mlflow.db'}",
        ]
    )
    upload(cfg.data, cfg.storage)
    return cfg, root


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", list(BAD_INPUTS.values()), ids=list(BAD_INPUTS))
def test_bad_input_one_error_and_storage_unchanged(tmp_path: Path, stored, case) -> None:
    name, content, line, problem = case
    cfg, root = stored
    path = tmp_path / name
    if content is not None:
        write(path, content)
    before = snapshot(root / "store")
    where = f"{path}:{line}: " if line else f"{path}: "
    with pytest.raises(DataError) as caught:
        upload(replace(cfg.data, train_file=str(path), test_file=str(root / "good" / "test.jsonl")), cfg.storage)
    message = str(caught.value)
    assert message.startswith(where + problem), message
    assert "\n" not in message
    assert snapshot(root / "store") == before
    assert records(read_split(LocalStorage(root / "store"), cfg.storage.dataset_prefix, "test")) == ROWS
