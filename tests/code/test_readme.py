"""The README's command sequences, run as written: each is the bash block after a `<!-- sequence: NAME -->` line."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from agnews.config import PROJECT_ROOT
from tests.helpers import require_agnews

pytestmark = pytest.mark.integration  # the README's steps, run as written

README = PROJECT_ROOT / "README.md"


def readme_sequence(name: str) -> str:
    """The bash block that follows ``<!-- sequence: name -->`` in the README."""
    found = re.search(rf"<!-- sequence: {re.escape(name)} -->\n```bash\n(.*?)```", README.read_text(), re.DOTALL)
    assert found, f"no sequence {name!r} in README.md"
    return found.group(1)


def checkout(tmp_path: Path) -> Path:
    """The project's files as a fresh checkout has them, in ``tmp_path/agnews-mlops``, with this work tree's .venv
    and the AG News copy at ``../shared/data/ag_news``, where the README expects them."""
    root = tmp_path / "agnews-mlops"
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        if (PROJECT_ROOT / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(PROJECT_ROOT / name, root / name)
    (root / ".venv").symlink_to(PROJECT_ROOT / ".venv")
    (tmp_path / "shared" / "data").mkdir(parents=True)
    (tmp_path / "shared" / "data" / "ag_news").symlink_to(require_agnews())
    return root


def run_as_written(block: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``block`` in bash, stopping at the first failing command, with no tracking server or bucket from the
    environment (the README's sequences run on the defaults in conf/)."""
    unset = ("MLFLOW_TRACKING_URI", "S3_BUCKET", "S3_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL")
    env = {key: value for key, value in os.environ.items() if key not in unset}
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )


def test_running_the_steps_as_written_ends_with_the_champion_mirrored(tmp_path: Path) -> None:
    root = checkout(tmp_path)
    done = run_as_written(readme_sequence("running-the-steps"), root)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    assert "distilbert-agnews v1 is @champion" in output
    pointer = json.loads((root / ".store" / "models" / "distilbert-agnews" / "champion.json").read_text())
    assert pointer["version"] == 1
    assert (root / ".store" / "models" / "distilbert-agnews" / pointer["manifest"]).is_file()
    assert (root / "mlflow" / "mlflow.db").is_file()
