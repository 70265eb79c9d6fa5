"""AG News parsing, validation, and the checked dataset layout in storage.

Layout under ``storage.dataset_prefix``: ``train.jsonl`` and ``test.jsonl`` (one ``{"text", "label"}`` per line,
label 0-3) and ``info.json`` (labels, counts, sha256 and size of each file), written last as the commit marker.
Uploads hold the lease ``<prefix>/.lock`` (``agnews.lease``), so two at once end as if one ran after the other.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

import pandas as pd
from sklearn.model_selection import train_test_split

from agnews.errors import DataError, NotFoundError
from agnews.settings import DataSettings
from agnews.storage import Storage
from bundle.layout import digest, sha256

SPLITS = ("train", "test")
FORMATS = (".csv", ".jsonl", ".parquet")
INFO = "info.json"
STAGING = ".staging"
# The fields of info.json that say who wrote it, when and from what: the rest describes the dataset itself.
PROVENANCE = ("source", "created_at", "code_version")

log = logging.getLogger(__name__)


def _fail(path: Path, line: int | None, problem: str) -> DataError:
    return DataError(f"{path}:{line}: {problem}" if line else f"{path}: {problem}")


def _read_text_lines(path: Path) -> list[str]:
    """The file's lines, decoded as UTF-8, or a DataError naming the first bad line."""
    if not path.is_file():
        raise _fail(path, None, "no such file")
    raw = path.read_bytes()
    if not raw.strip():
        raise _fail(path, None, "empty file")
    lines = raw.split(b"\n")
    for number, line in enumerate(lines, 1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _fail(path, number, f"bytes are not UTF-8 ({exc.reason} at column {exc.start + 1})") from None
    # Only \n, \r\n and \r end a line: str.splitlines would also split at U+2028, U+0085 and others inside a text.
    return io.StringIO(raw.decode("utf-8"), newline="").readlines()


def _check(path: Path, line: int, text: object, label: object, n_labels: int, base: int) -> tuple[str, int]:
    if not isinstance(text, str) or not text.strip():
        raise _fail(path, line, "empty text")
    if label is None or label is pd.NA:
        raise _fail(path, line, "missing label")
    if isinstance(label, bool) or not isinstance(label, int) or not base <= label < base + n_labels:
        raise _fail(path, line, f"label {label!r} out of range {base}-{base + n_labels - 1}")
    return text, label - base


def parse_csv(path: Path, n_labels: int) -> pd.DataFrame:
    """Original AG News CSV: no header, ``"class","title","description"``, class 1-4.

    The text is title + " " + description, as torchtext builds it.
    """
    rows: list[tuple[str, int]] = []
    reader = csv.reader(_read_text_lines(path))
    for row in reader:
        line = reader.line_num
        if len(row) != 3:
            raise _fail(path, line, f"expected 3 columns (class, title, description), found {len(row)}")
        label, title, description = row
        if not label.strip().isdecimal():
            problem = "a header row, but AG News CSV has none" if line == 1 else f"class {label!r} is not a number"
            raise _fail(path, line, problem)
        rows.append(_check(path, line, f"{title} {description}".strip(), int(label), n_labels, base=1))
    return pd.DataFrame(rows, columns=["text", "label"])


def parse_jsonl(path: Path, n_labels: int) -> pd.DataFrame:
    """One ``{"text": str, "label": 0-3}`` object per line."""
    rows: list[tuple[str, int]] = []
    for line, content in enumerate(_read_text_lines(path), 1):
        if not content.strip():
            continue
        try:
            obj = json.loads(content)
        except json.JSONDecodeError as exc:
            raise _fail(path, line, f"invalid JSON ({exc.msg})") from None
        if not isinstance(obj, dict) or set(obj) != {"text", "label"}:
            found = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            raise _fail(path, line, f"expected keys ['label', 'text'], found {found}")
        rows.append(_check(path, line, obj["text"], obj["label"], n_labels, base=0))
    return pd.DataFrame(rows, columns=["text", "label"])


def parse_records(path: Path, frame: pd.DataFrame, n_labels: int) -> pd.DataFrame:
    """Validate a table with columns ``text`` and ``label`` (0-based); rows are numbered from 1."""
    if frame.empty:
        raise _fail(path, None, "empty file")
    if sorted(frame.columns) != ["label", "text"]:
        raise _fail(path, None, f"expected columns ['label', 'text'], found {sorted(map(str, frame.columns))}")
    # Python ints (a column with nulls reads as float: convert_dtypes restores the ints), pd.NA for nulls.
    labels = frame["label"].convert_dtypes().tolist()
    rows = [
        _check(path, row, text, label, n_labels, base=0)
        for row, (text, label) in enumerate(zip(frame["text"].tolist(), labels, strict=True), 1)
    ]
    return pd.DataFrame(rows, columns=["text", "label"])


def parse_file(path: Path, n_labels: int) -> pd.DataFrame:
    """Parse one split file by its extension."""
    if not path.is_file():
        raise _fail(path, None, "no such file")
    if path.suffix == ".csv":
        return parse_csv(path, n_labels)
    if path.suffix == ".jsonl":
        return parse_jsonl(path, n_labels)
    if path.suffix == ".parquet":
        try:
            frame = pd.read_parquet(path)
        except Exception as exc:  # pyarrow raises several types for a bad file
            raise _fail(path, None, f"not a readable parquet file ({exc})") from None
        return parse_records(path, frame, n_labels)
    raise _fail(path, None, f"unsupported format '{path.suffix}' (use {', '.join(FORMATS)})")


def _split_file(folder: Path, split: str) -> Path:
    found = [folder / f"{split}{ext}" for ext in FORMATS if (folder / f"{split}{ext}").is_file()]
    if not found:
        raise DataError(f"{folder}: no {split} file ({' or '.join(split + ext for ext in FORMATS)})")
    return found[0]


def load_hub(name: str, n_labels: int) -> dict[str, pd.DataFrame]:
    """A Hugging Face Hub dataset with ``text`` and ``label`` columns and train/test splits."""
    import datasets  # heavy import, only for this source

    try:
        loaded = datasets.load_dataset(name)
    except Exception as exc:  # datasets raises many types for an unreachable or unknown dataset
        raise DataError(
            f"cannot load dataset '{name}' from the Hugging Face Hub ({type(exc).__name__}); offline, point "
            "data.source at a local folder such as ../shared/data/ag_news"
        ) from None
    return {split: parse_records(Path(f"{name}[{split}]"), loaded[split].to_pandas(), n_labels) for split in SPLITS}


def load_source(data: DataSettings) -> dict[str, pd.DataFrame]:
    """Read both splits from ``data.train_file``/``data.test_file``, a folder, or the Hub."""
    n_labels = len(data.labels)
    if data.train_file and data.test_file:
        files = {"train": data.train_file, "test": data.test_file}
        return {split: parse_file(Path(files[split]).expanduser(), n_labels) for split in SPLITS}
    if data.train_file or data.test_file:
        raise DataError("set both data.train_file and data.test_file, or neither")
    source = str(data.source)
    folder = Path(source).expanduser()
    if folder.is_dir():
        return {split: parse_file(_split_file(folder, split), n_labels) for split in SPLITS}
    if folder.exists() or source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise DataError(f"{source}: not a folder with train and test files, nor a Hub dataset id")
    return load_hub(source, n_labels)


def to_jsonl(frame: pd.DataFrame) -> bytes:
    """Canonical JSONL bytes: the same rows always give the same sha256."""
    lines = (
        json.dumps({"text": t, "label": int(y)}, ensure_ascii=False)
        for t, y in zip(frame.text, frame.label, strict=True)
    )
    return ("\n".join(lines) + "\n").encode("utf-8")


def build_info(
    splits: dict[str, pd.DataFrame], files: dict[str, bytes], labels: list[str], source: str, code_version: str
) -> dict:
    """The manifest written last as ``info.json``."""
    return {
        "labels": list(labels),
        "counts": {
            split: {
                "rows": len(frame),
                "per_class": {name: int((frame.label == i).sum()) for i, name in enumerate(labels)},
            }
            for split, frame in splits.items()
        },
        "files": {name: digest(data) for name, data in files.items()},
        "source": source,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "code_version": code_version,
    }


def read_info(storage: Storage, prefix: str) -> dict:
    """The dataset's info.json, or the advice to run the upload step."""
    try:
        return json.loads(storage.read_bytes(f"{prefix}/{INFO}"))
    except NotFoundError:
        raise DataError(f"no dataset at {storage.url(prefix)}: run the upload step first") from None
    except ValueError as exc:
        url = storage.url(f"{prefix}/{INFO}")
        raise DataError(f"{url} is not valid JSON ({exc}): run the upload step again") from None


def described(info: dict) -> dict:
    """What info.json says about the dataset: every field but its provenance (``PROVENANCE``)."""
    return {key: value for key, value in info.items() if key not in PROVENANCE}


def is_current(storage: Storage, prefix: str, files: dict[str, bytes], info: dict) -> bool:
    """True when storage already holds exactly these files, committed by an info.json that describes them as
    ``info`` does: every field but the provenance compared, so that a tampered row count is uploaded again.

    Each stored file is read back and its sha256 compared: a file of the right size can still be corrupt (one
    changed letter), and only its content says so. The size is checked first, which spares the read when it differs.
    """
    try:
        stored = read_info(storage, prefix)
    except DataError:
        return False

    def holds(name: str, data: bytes) -> bool:
        key = f"{prefix}/{name}"
        if storage.size(key) != len(data):
            return False
        try:
            return sha256(storage.read_bytes(key)) == sha256(data)
        except NotFoundError:
            return False

    in_place = described(stored) == described(info) and all(holds(name, data) for name, data in files.items())
    return in_place and not storage.list(f"{prefix}/{STAGING}")


def _staged(prefix: str, name: str, digest: str) -> str:
    return f"{prefix}/{STAGING}/{digest}/{name}"


def store_dataset(
    storage: Storage, prefix: str, files: dict[str, bytes], info: dict, fence: Callable[[], None]
) -> bool:
    """Stage the data files, commit them with info.json, then move them into place; the caller holds the dataset's
    lease, and ``fence`` (``Lease.check``) raises before any write once it is lost.

    Returns False when storage already holds exactly these files and info. A run that dies before info.json is
    written leaves the previous dataset as it was; one that dies after it leaves the new dataset readable, because
    ``read_split`` falls back to the staged copy (kept under its sha256) until the file is in place.
    """
    if is_current(storage, prefix, files, info):
        return False
    for name, data in files.items():
        fence()
        storage.write_bytes(_staged(prefix, name, sha256(data)), data)
    fence()
    storage.write_bytes(f"{prefix}/{INFO}", json.dumps(info, indent=2).encode())
    for name, data in files.items():
        staged = _staged(prefix, name, sha256(data))
        fence()
        try:
            storage.copy(staged, f"{prefix}/{name}")
        except NotFoundError:
            raise DataError(
                f"the staged {storage.url(staged)} went missing before it was moved into place (removed by a "
                "process that does not hold the upload lease?): run the upload step again"
            ) from None
    for key in storage.list(f"{prefix}/{STAGING}"):
        fence()
        storage.delete(key)
    return True


class StoredDataset(NamedTuple):
    """The dataset in storage with its info.json, read once: what a train run takes its splits from."""

    storage: Storage
    prefix: str
    info: dict

    @classmethod
    def open(cls, storage: Storage, prefix: str) -> StoredDataset:
        return cls(storage, prefix, read_info(storage, prefix))

    def url(self, split: str) -> str:
        return self.storage.url(f"{self.prefix}/{split}.jsonl")

    def split(self, split: str) -> pd.DataFrame:
        return read_split(self.storage, self.prefix, split, self.info)


def read_split(storage: Storage, prefix: str, split: str, info: dict | None = None) -> pd.DataFrame:
    """Load a split from storage after checking its sha256 against info.json (read here unless given); rows are
    indexed by their line number.

    A file that an interrupted upload committed but did not move into place is read from its staged copy.
    """
    info = info or read_info(storage, prefix)
    name = f"{split}.jsonl"
    if name not in info["files"]:
        raise DataError(f"{storage.url(prefix)}/{INFO} lists no {name}")
    digest = info["files"][name]["sha256"]
    key = f"{prefix}/{name}"
    for candidate in (key, _staged(prefix, name, digest)):
        if storage.exists(candidate) and sha256(data := storage.read_bytes(candidate)) == digest:
            return pd.read_json(io.BytesIO(data), lines=True, dtype={"text": str, "label": int})
    if not storage.exists(key):
        raise DataError(f"{storage.url(key)} is missing: run the upload step again")
    raise DataError(
        f"{storage.url(key)}: sha256 does not match {INFO} (corrupt or half-written); run the upload step again"
    )


def rows_sha256(rows: Iterable[int]) -> str:
    """The identity of a selection of a split's rows: the sha256 of their line numbers in the split's file (0-based,
    ascending, comma-separated), whatever order they were drawn or evaluated in."""
    return sha256(",".join(str(row) for row in sorted(rows)).encode())


def draw(frame: pd.DataFrame, size: int | None, seed: int, name: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``size`` rows with the class balance of ``frame``, seeded, and the rows left; None or 0 draws every row.
    Rows keep their index: ``read_split``'s line numbers, which name the rows scored (``dataset.test.rows_sha256``)."""
    if not size or size == len(frame):
        return frame, frame.iloc[:0]
    if size > len(frame):
        raise DataError(f"{name}={size} is larger than the {len(frame)} rows available")
    sample, rest = train_test_split(frame, train_size=size, stratify=frame.label, random_state=seed)
    return sample, rest


def stratified_sample(frame: pd.DataFrame, size: int | None, seed: int, name: str) -> pd.DataFrame:
    """``size`` rows with the class balance of ``frame``, seeded; None or 0 keeps every row."""
    return draw(frame, size, seed, name)[0]


def split_train(frame: pd.DataFrame, sample_size: int | None, val_size: int, seed: int) -> tuple[pd.DataFrame, ...]:
    """The training sample and the validation rows: disjoint, stratified and seeded.

    The training sample is drawn first, exactly as without validation, and validation from the rows it leaves;
    only when it leaves too few (``sample_size`` null, or near the split's size) is validation drawn first.
    """
    if sample_size and sample_size + val_size <= len(frame):
        sample, rest = draw(frame, sample_size, seed, "data.sample_size")
        return sample, draw(rest, val_size, seed, "data.val_size")[0]
    if sample_size and sample_size > len(frame):
        raise DataError(f"data.sample_size={sample_size} is larger than the {len(frame)} rows available")
    val, rest = draw(frame, val_size, seed, "data.val_size")
    if sample_size and sample_size > len(rest):
        raise DataError(
            f"data.sample_size={sample_size} is larger than the {len(rest)} rows left after data.val_size={val_size}"
        )
    return stratified_sample(rest, sample_size, seed, "data.sample_size"), val


def by_length(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows sorted by text length (stable), with their index: evaluation batches then pad little, in a known order."""
    return frame.iloc[frame.text.str.len().argsort(kind="stable")]
