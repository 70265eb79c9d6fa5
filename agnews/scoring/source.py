"""The input: a file or a folder of files, local or ``s3://``, of CSV (with a header row), JSON lines or parquet.

Read in chunks of rows, so that memory follows the chunk and not the dataset: CSV and parquet through a pyarrow
dataset, JSON lines through pandas, which keeps a value of the wrong type (a number, a list) as it is, for the
scorer to refuse row by row. CSV has no types: every column is read as a string, by either engine.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from agnews.errors import ConfigError, DataError
from agnews.settings import PredictSettings

FORMATS = {".csv": "csv", ".jsonl": "json", ".json": "json", ".ndjson": "json", ".parquet": "parquet", ".pq": "parquet"}
HIDDEN = (".", "_")  # names that Spark and Hadoop skip when they read a folder: _SUCCESS, .crc files, _temporary/
JSON_SCHEMA_ROWS = 1000  # JSON lines read to learn the columns
READ_BYTES = 1 << 20


@dataclass(frozen=True)
class Location:
    """A path as pyarrow reaches it: its filesystem, the path there, and its URL (``s3://...`` or absolute)."""

    fs: pafs.FileSystem
    path: str
    url: str

    @property
    def s3(self) -> bool:
        return self.url.startswith("s3://")

    def child(self, name: str) -> Location:
        return Location(self.fs, f"{self.path.rstrip('/')}/{name}", f"{self.url.rstrip('/')}/{name}")


def s3_filesystem() -> pafs.S3FileSystem:
    """pyarrow's S3 client, with boto3's settings: the standard credential chain, AWS_REGION, S3_ENDPOINT_URL."""
    endpoint = os.environ.get("S3_ENDPOINT_URL")
    options: dict[str, str] = {}
    if endpoint:
        parsed = urlparse(endpoint)
        options = {"endpoint_override": parsed.netloc or endpoint, "scheme": parsed.scheme or "https"}
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    return pafs.S3FileSystem(region=region, **options) if region else pafs.S3FileSystem(**options)


def locate(url: str) -> Location:
    """``url`` (``s3://bucket/key``, ``file:///path`` or a local path) as a Location."""
    if url.startswith("s3://"):
        path = url.removeprefix("s3://").rstrip("/")
        if not path.split("/")[0]:
            raise ConfigError(f"{url} names no bucket")
        return Location(s3_filesystem(), path, f"s3://{path}")
    path = str(Path(url.removeprefix("file://")).expanduser().resolve())
    return Location(pafs.LocalFileSystem(), path, path)


@dataclass(frozen=True)
class Source:
    """The input's files, their one format, and its columns with their types."""

    location: Location
    files: list[pafs.FileInfo]
    format: str
    schema: pa.Schema

    def listing(self) -> list[dict[str, str | int]]:
        """Each file's path (below the input), size and sha256, read in full."""
        listed = []
        base = self.location.path.rstrip("/")
        for file in self.files:
            digest = hashlib.sha256()
            with self.location.fs.open_input_stream(file.path) as stream:
                while block := stream.read(READ_BYTES):
                    digest.update(block)
            name = file.path.removeprefix(base).lstrip("/") or Path(file.path).name
            listed.append({"path": name, "bytes": file.size, "sha256": digest.hexdigest()})
        return listed

    def urls(self) -> list[str]:
        return [f"s3://{f.path}" if self.location.s3 else f.path for f in self.files]

    def _dataset(self) -> ds.Dataset:
        paths = [f.path for f in self.files]
        if self.format == "csv":
            return ds.dataset(paths, filesystem=self.location.fs, format=_csv_format(self.schema.names))
        return ds.dataset(paths, filesystem=self.location.fs, format="parquet")

    def rows(self) -> int | None:
        """The number of rows when the files say it without being read (parquet's footers), else None."""
        return self._dataset().count_rows() if self.format == "parquet" else None

    def frames(self, columns: list[str], chunk_rows: int) -> Iterator[pd.DataFrame]:
        """``columns`` of the input, at most ``chunk_rows`` rows at a time, in the files' order."""
        try:
            if self.format == "json":
                for file in self.files:
                    with self.location.fs.open_input_stream(file.path) as stream:
                        reader = pd.read_json(stream, lines=True, chunksize=chunk_rows, dtype=False)
                        for chunk in reader:
                            yield chunk.reindex(columns=columns)
                return
            for batch in self._dataset().to_batches(columns=columns, batch_size=chunk_rows):
                yield batch.to_pandas()
        except (pa.ArrowException, ValueError) as exc:
            raise DataError(f"predict.input {self.location.url} cannot be read as {self.format}: {exc}") from None


def _csv_format(names: list[str] | None = None) -> ds.CsvFileFormat:
    """CSV with a header row, quoted values that may hold newlines, and (given the names) every column a string."""
    convert = pacsv.ConvertOptions(column_types=dict.fromkeys(names, pa.string())) if names else None
    return ds.CsvFileFormat(parse_options=pacsv.ParseOptions(newlines_in_values=True), convert_options=convert)


def _format(files: list[pafs.FileInfo], chosen: str, url: str) -> str:
    if chosen != "auto":
        return chosen
    found = {FORMATS.get(Path(f.path).suffix.lower()) for f in files}
    if None in found:
        odd = next(f.path for f in files if Path(f.path).suffix.lower() not in FORMATS)
        raise DataError(f"predict.input {url}: {odd} is not .csv, .jsonl or .parquet (or set predict.format)")
    if len(found) > 1:
        raise DataError(f"predict.input {url} mixes formats ({', '.join(sorted(map(str, found)))}): one per input")
    return found.pop() or "csv"


def _schema(location: Location, files: list[pafs.FileInfo], form: str) -> pa.Schema:
    if form == "json":
        with location.fs.open_input_stream(files[0].path) as stream:
            head = next(pd.read_json(stream, lines=True, chunksize=JSON_SCHEMA_ROWS, dtype=False), pd.DataFrame())
        return pa.schema([_json_field(head[name]) for name in head.columns])
    paths = [f.path for f in files]
    schema = ds.dataset(paths, filesystem=location.fs, format=_csv_format() if form == "csv" else form).schema
    return pa.schema([pa.field(name, pa.string()) for name in schema.names]) if form == "csv" else schema


def _json_field(column: pd.Series) -> pa.Field:
    """A JSON column's type as its first rows show it; a string where they mix types (the scorer refuses the
    values that are not strings in the text column, row by row)."""
    try:
        return pa.field(str(column.name), pa.Array.from_pandas(column).type)
    except (pa.ArrowException, TypeError, ValueError):
        return pa.field(str(column.name), pa.string())


def open_source(settings: PredictSettings) -> Source:
    """The input that ``predict.input`` names, with its files listed and its columns checked; a DataError, in one
    line, for an input that is missing, empty, of an unknown format, unreadable, or without a named column."""
    if not settings.input:
        raise ConfigError("predict.input is not set: name a file or folder of CSV, JSON lines or parquet")
    location = locate(settings.input)
    try:
        info = location.fs.get_file_info(location.path)
        if info.type == pafs.FileType.NotFound:
            raise DataError(f"predict.input {location.url}: no such file or folder")
        if info.type == pafs.FileType.Directory:
            selector = pafs.FileSelector(location.path, recursive=True)
            found = location.fs.get_file_info(selector)
            files = sorted(
                (f for f in found if f.type == pafs.FileType.File and not _hidden(f.path, location.path)),
                key=lambda f: f.path,
            )
        else:
            files = [info]
        if not files:
            raise DataError(f"predict.input {location.url}: the folder holds no files")
        form = _format(files, settings.format, location.url)
        schema = _schema(location, files, form)
    except (pa.ArrowException, ValueError, OSError) as exc:
        raise DataError(f"predict.input {location.url} cannot be read: {str(exc).splitlines()[0]}") from None
    wanted = [settings.text_column, *settings.keep_columns]
    missing = [name for name in wanted if name not in schema.names]
    if missing:
        raise DataError(
            f"predict.input {location.url} has no column {', '.join(map(repr, missing))} "
            f"(it has {', '.join(schema.names)}): set predict.text_column or predict.keep_columns"
        )
    return Source(location, files, form, schema)


def _hidden(path: str, base: str) -> bool:
    return any(part.startswith(HIDDEN) for part in path.removeprefix(base).split("/") if part)
