"""The checkpoint that ``train.resume=true`` continues from, and the run that wrote it.

The Trainer writes a checkpoint folder in this order: the model (``config.json``, then the weights), the optimizer,
scheduler and RNG states, and ``trainer_state.json`` last. A process killed during the save leaves a folder without
the later files (only ``config.json``, say), which the Trainer cannot resume from. A checkpoint is complete when its
``trainer_state.json`` parses and its weights are there; resuming takes the newest complete one.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import mlflow
from transformers.trainer import TRAINER_STATE_NAME
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

from agnews.errors import CheckpointError
from agnews.names import RESUMED_FROM_CHECKPOINT_TAG, RESUMED_FROM_RUN_TAG

log = logging.getLogger(__name__)

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
WEIGHTS = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME)
# In train.output_dir: the MLflow run that is training into it, written when training starts.
RUN_FILE = "mlflow_run.json"


def found(output_dir: Path) -> list[Path]:
    """The checkpoint folders in ``output_dir``, newest (highest step) first."""
    if not output_dir.is_dir():
        return []
    steps = {p: int(match.group(1)) for p in output_dir.iterdir() if p.is_dir() and (match := CHECKPOINT.match(p.name))}
    return sorted(steps, key=steps.__getitem__, reverse=True)


def incomplete(folder: Path) -> str | None:
    """Why ``folder`` cannot be resumed from, or None when it is complete."""
    try:
        state = json.loads((folder / TRAINER_STATE_NAME).read_text())
    except FileNotFoundError:
        return f"no {TRAINER_STATE_NAME}"
    except (OSError, ValueError):
        return f"unreadable {TRAINER_STATE_NAME}"
    if not isinstance(state, dict) or "global_step" not in state:
        return f"unreadable {TRAINER_STATE_NAME}"
    if not any((folder / name).is_file() for name in WEIGHTS):
        return "no model weights"
    return None


def newest_complete(output_dir: Path) -> Path | None:
    """The newest complete checkpoint in ``output_dir``; None when it holds no checkpoint at all.

    Raises CheckpointError when it holds checkpoints and none is complete.
    """
    skipped = []
    for folder in found(output_dir):
        if (problem := incomplete(folder)) is None:
            return folder
        skipped.append(f"{folder.name}: {problem}")
    if skipped:
        raise CheckpointError(
            f"train.resume=true, but no checkpoint in {output_dir} is complete ({'; '.join(skipped)}): "
            "run without train.resume to start afresh"
        )
    return None


def writer(output_dir: Path) -> str | None:
    """The run id recorded in ``output_dir`` when training into it started, if any."""
    try:
        return json.loads((output_dir / RUN_FILE).read_text())["run"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def prepare(output_dir: Path, resume: bool, main_process: bool = True) -> str | None:
    """Choose where training starts; returns the checkpoint to resume from, or None to start afresh.

    With ``resume``, the newest complete checkpoint (incomplete newer ones are removed, on the main process, so
    that the Trainer's rotation does not count them); without, or when there is none, the main process empties
    ``output_dir``. A resumed run is tagged with the checkpoint (``resumed_from_checkpoint``) and with the run
    that wrote it (``resumed_from_run``); the active run is then recorded in ``output_dir`` for the next resume.
    """
    checkpoint = newest_complete(output_dir) if resume else None
    if resume and checkpoint is None:
        log.warning("train.resume=true but %s holds no checkpoint: starting from scratch", output_dir)
    if not main_process:
        return str(checkpoint) if checkpoint else None
    if checkpoint is None:
        shutil.rmtree(output_dir, ignore_errors=True)
    else:
        folders = found(output_dir)  # newest first: the ones before the checkpoint are newer, and incomplete
        for folder in folders[: folders.index(checkpoint)]:
            log.warning("removing %s: incomplete (%s), left by a run killed while saving", folder, incomplete(folder))
            shutil.rmtree(folder)
        previous = writer(output_dir)
        log.info("resuming from %s (run %s)", checkpoint, previous or "unknown")
        if mlflow.active_run():
            mlflow.set_tag(RESUMED_FROM_CHECKPOINT_TAG, str(checkpoint))
            if previous:
                mlflow.set_tag(RESUMED_FROM_RUN_TAG, previous)
    if run := mlflow.active_run():
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / RUN_FILE).write_text(json.dumps({"run": run.info.run_id}) + "\n")
    return str(checkpoint) if checkpoint else None
