"""The README's command sequences, run as written: each is the bash block after a `<!-- sequence: NAME -->` line.

"Running the steps" runs here; the webhook set-up of "Promoting by hand in the MLflow UI" runs in
test_promotion_webhook.py (against a tracking server with its default workers), and the `mlflow run` example in
test_container.py (in a container engine).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import checkout, readme_sequence, run_as_written

pytestmark = pytest.mark.integration  # the README's steps, run as written


def test_running_the_steps_as_written_ends_with_the_champion_mirrored(tmp_path: Path) -> None:
    root = checkout(tmp_path)
    with run_as_written(readme_sequence("running-the-steps"), root) as done:
        output = done.output()
    assert done.returncode == 0, output[-4000:]
    assert "distilbert-agnews v1 is @champion" in output
    pointer = json.loads((root / ".store" / "models" / "distilbert-agnews" / "champion.json").read_text())
    assert pointer["version"] == 1
    assert (root / ".store" / "models" / "distilbert-agnews" / pointer["manifest"]).is_file()
    assert (root / "mlflow" / "mlflow.db").is_file()
