"""Upload: AG News from the Hub or local files into storage as checked JSONL, logged as ``mlflow.data`` inputs."""

from __future__ import annotations

import logging
import re
import warnings

import mlflow
import pandas as pd
from mlflow.data.pandas_dataset import from_pandas

from agnews import names
from agnews.config import code_version
from agnews.data import INFO, build_info, load_source, read_info, store_dataset, to_jsonl
from agnews.lease import held, lock_key
from agnews.settings import DataSettings, Settings, StorageSettings
from agnews.storage import open_storage

log = logging.getLogger(__name__)


def upload(data: DataSettings, settings: StorageSettings) -> tuple[dict[str, pd.DataFrame], dict, bool]:
    """Parse and validate both splits, then publish them under the dataset's lease; returns (splits, info, changed)."""
    splits = load_source(data)
    files = {f"{split}.jsonl": to_jsonl(frame) for split, frame in splits.items()}
    storage = open_storage(settings)
    prefix = settings.dataset_prefix
    source = f"{data.train_file} + {data.test_file}" if data.train_file else str(data.source)
    info = build_info(splits, files, list(data.labels), source, code_version())
    with held(storage, lock_key(prefix), f"upload {prefix}", settings) as lease:
        changed = store_dataset(storage, prefix, files, info, lease.check)
        if not changed:
            info = read_info(storage, prefix)
    if changed:
        log.info("uploaded %s to %s", ", ".join(files), storage.url(prefix))
    else:
        log.info("dataset at %s is already up to date: nothing uploaded", storage.url(prefix))
    return splits, info, changed


def log_frame(frame: pd.DataFrame, source: str, name: str, context: str) -> None:
    """Log ``frame`` (``text``, ``label``) as an ``mlflow.data`` input of the active run, read from ``source``."""
    with warnings.catch_warnings():
        # MLflow registers its local artifact source twice and says a file URL fits both; and it hints that an
        # integer column cannot hold missing values, which labels never are. Neither is for a user to act on. The
        # hint comes from the schema, which MLflow infers again each time it is read: in log_input too.
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
        warnings.filterwarnings("ignore", message="Hint: Inferred schema contains integer column")
        dataset = from_pandas(frame, source=source, name=name, targets="label")
        mlflow.log_input(dataset, context=context)


def log_dataset(settings: StorageSettings, splits: dict[str, pd.DataFrame], info: dict) -> None:
    """Log each split as an mlflow.data input, plus row counts and info.json."""
    storage = open_storage(settings)
    prefix = settings.dataset_prefix
    for split, frame in splits.items():
        name = f"{split}.jsonl"
        log_frame(frame, storage.url(f"{prefix}/{name}"), f"ag_news-{split}", split)
        mlflow.set_tag(names.SPLIT_SHA256_TAGS[split], info["files"][name]["sha256"])
        counts = info["counts"][split]
        mlflow.log_metric(f"rows_{split}", counts["rows"])
        for label, count in counts["per_class"].items():
            mlflow.log_metric(f"rows_{split}_{re.sub(r'[^a-z0-9]+', '_', label.lower())}", count)
    mlflow.log_dict(info, INFO)


def upload_and_log(cfg: Settings) -> bool:
    """The step's work in the active run: publish, tag whether the dataset changed, log it; True when uploaded."""
    splits, info, changed = upload(cfg.data, cfg.storage)
    mlflow.set_tag(names.DATASET_CHANGED_TAG, str(changed).lower())
    log_dataset(cfg.storage, splits, info)
    return changed
