"""The output: a parquet dataset written whole to a staging place beside ``predict.output``, then committed.

On a local disk the staging folder is renamed into place, so that ``predict.output`` holds a complete dataset or
nothing: a job killed at any point before leaves only a hidden ``.<name>.<id>.tmp`` folder beside it. S3 has no
rename: the staged files are copied into place (server-side) and ``_SUCCESS`` is written last, so a reader knows a
complete dataset by that marker, as it does one that Spark wrote.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs

from agnews.errors import ConfigError, StorageError
from agnews.scoring.source import Location, locate

SUCCESS = "_SUCCESS"  # Hadoop's marker of a complete output folder, which Spark's committer writes last

log = logging.getLogger(__name__)


def exists(location: Location) -> bool:
    return location.fs.get_file_info(location.path).type != pafs.FileType.NotFound


@dataclass(frozen=True)
class Target:
    """Where the output goes and where it is staged first."""

    location: Location
    staging: Location

    def commit(self, overwrite: bool) -> None:
        """Put the staged dataset at the output; an existing one is replaced only with ``overwrite``."""
        if exists(self.location) and not overwrite:  # written while this job ran
            raise StorageError(f"predict.output {self.location.url} appeared while this job ran: not replaced")
        try:
            if self.location.s3:
                self._copy_into_place()
            else:
                self._rename_into_place()
        except (OSError, pa.ArrowException) as exc:
            raise StorageError(f"cannot commit {self.location.url}: {exc}") from None
        log.info("wrote %s", self.location.url)

    def _rename_into_place(self) -> None:
        fs = self.location.fs
        old = None
        if exists(self.location):
            old = sibling(self.location, "old")
            fs.move(self.location.path, old.path)
        fs.move(self.staging.path, self.location.path)
        if old:
            fs.delete_dir(old.path)

    def _copy_into_place(self) -> None:
        fs = self.location.fs
        if exists(self.location):
            fs.delete_dir_contents(self.location.path, missing_dir_ok=True)
        staged = [f for f in fs.get_file_info(pafs.FileSelector(self.staging.path, recursive=True)) if f.is_file]
        marker = None
        for file in staged:
            name = file.path.removeprefix(self.staging.path).lstrip("/")
            if name == SUCCESS:
                marker = file
                continue
            fs.copy_file(file.path, self.location.child(name).path)
        if marker:
            fs.copy_file(marker.path, self.location.child(SUCCESS).path)
        fs.delete_dir(self.staging.path)

    def abandon(self) -> None:
        """Remove what the staging place holds (after a failed job)."""
        try:
            if exists(self.staging):
                self.staging.fs.delete_dir(self.staging.path)
        except (OSError, pa.ArrowException) as exc:
            log.warning("could not remove %s: %s", self.staging.url, exc)


def sibling(location: Location, kind: str) -> Location:
    """A hidden place beside ``location`` (``.<name>.<id>.<kind>``), which readers of its folder skip."""
    parent, _, name = location.path.rstrip("/").rpartition("/")
    hidden = f".{name}.{uuid.uuid4().hex[:12]}.{kind}"
    url_parent = location.url.rstrip("/").rpartition("/")[0]
    return Location(location.fs, f"{parent}/{hidden}", f"{url_parent}/{hidden}")


def target(output: str | None, overwrite: bool) -> Target:
    """The output that ``predict.output`` names, refused in one line when it exists and ``overwrite`` is false."""
    if not output:
        raise ConfigError("predict.output is not set: name the parquet dataset to write, local or s3://")
    location = locate(output)
    try:
        found = exists(location)
    except (OSError, pa.ArrowException) as exc:
        raise StorageError(f"predict.output {location.url} cannot be checked: {exc}") from None
    if found and not overwrite:
        raise StorageError(f"predict.output {location.url} exists: choose another, or set predict.overwrite=true")
    return Target(location, sibling(location, "tmp"))
