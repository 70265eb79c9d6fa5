"""The version to score with: resolved in the registry, its bundle and manifest fetched as the mirror lays them out.

The manifest is the mirror's own (``promotion.mirror.version_files``): the same bytes that the mirror step writes
for this version, so the sha256 that each output row carries is the one that ``champion.json`` names when the
Lambda serves the version. The files are checked against it where they are loaded (``rows.predictor``).
"""

from __future__ import annotations

import re
from pathlib import Path

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from agnews.errors import RegistryError
from agnews.promotion.mirror import version_files
from agnews.scoring.rows import Model, labels, verified

MODEL_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w-]+))")


def fetch(uri: str, into: Path) -> Model:
    """The registered version that ``uri`` (``models:/<name>/<version>`` or ``models:/<name>@<alias>``) names, its
    bundle and manifest in a folder below ``into``; a RegistryError, in one line, for one the registry lacks."""
    match = MODEL_URI.fullmatch(uri)
    if match is None:
        raise RegistryError(f"predict.model={uri} is not models:/<name>/<version> or models:/<name>@<alias>")
    client = MlflowClient()
    name, number, alias = match["name"], match["version"], match["alias"]
    try:
        version = client.get_model_version(name, number) if number else client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        raise RegistryError(f"predict.model={uri}: the registry has no such version ({exc.error_code})") from None
    folder_name, files = version_files(client, version)
    folder = into / folder_name
    folder.mkdir(parents=True)
    for file, data in files.items():
        (folder / file).write_bytes(data)
    return Model(name, int(version.version), verified(folder), labels(folder), folder)
