"""The command sequences of the README and docs/, run as written: each is the bash block after a
`<!-- sequence: NAME -->` line.

"Train and serve locally" runs here, and "Promote in the MLflow UI" after it up to the UI's call; the webhook set-up
also runs in test_promotion_webhook.py (against a tracking server of its own), and the `mlflow run` example in
test_container.py (in a container engine).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from agnews.config import PROJECT_ROOT
from tests.helpers import checkout, readme_sequence, run_as_written, sequences


def test_every_marked_sequence_is_run_by_a_test() -> None:
    """A block marked as a sequence promises that it runs as written: some test must run it by its name."""
    tests = "\n".join(path.read_text() for path in (PROJECT_ROOT / "tests").rglob("test_*.py"))
    run = set(re.findall(r'readme_sequence\("([\w-]+)"\)', tests))
    marked = sequences()
    assert marked, "no sequence marked in README.md or docs/"
    assert {name: str(doc.relative_to(PROJECT_ROOT)) for name, (doc, _) in marked.items() if name not in run} == {}


@pytest.mark.e2e
@pytest.mark.integration  # trains, registers and serves
def test_train_and_serve_as_written_answers_from_the_mirrored_champion(tmp_path: Path) -> None:
    root = checkout(tmp_path)
    with run_as_written(readme_sequence("train-and-serve"), root) as done:
        output = done.output()
    assert done.returncode == 0, output[-4000:]
    assert "distilbert-agnews v1 is @champion" in output
    pointer = json.loads((root / ".store" / "models" / "distilbert-agnews" / "champion.json").read_text())
    assert pointer["version"] == 1
    assert (root / ".store" / "models" / "distilbert-agnews" / pointer["manifest"]).is_file()
    assert (root / "mlflow" / "mlflow.db").is_file()
    # curl's answer, the handler's body (json.dumps' spacing: the server's own JSON log lines are compact)
    answer = json.loads(re.findall(r'\{"predicted_class": .*?"model_version": \d+\}', output)[-1])
    assert answer["model_version"] == 1
    assert answer["predicted_class"] in answer["probabilities"]
    assert len(answer["probabilities"]) == 4


@pytest.mark.e2e
@pytest.mark.integration  # trains, registers, starts a tracking server and the webhook receiver
def test_promote_in_the_ui_as_written_serves_the_version_moved(tmp_path: Path) -> None:
    """The README's "Train and serve locally", then "Promote in the MLflow UI" in the same shell: the server with its
    three settings on 127.0.0.1:5000, the receiver on 8088 and its webhook, and a v2 that the production gate turns
    down. @champion moved to v2 on the server, as the UI's Save aliases does, reaches champion.json, v1 @previous."""
    root = checkout(tmp_path)
    path = [readme_sequence("train-and-serve"), readme_sequence("ui-server")]
    path += [readme_sequence("webhook-setup"), readme_sequence("ui-challenger")]
    with run_as_written("\n".join(path), root) as done:
        output = done.output()
        assert done.returncode == 0, output[-4000:]
        assert re.search(r"webhook .* delivers .* to http://localhost:8088/", output), output[-4000:]
        assert "distilbert-agnews v2 is @challenger" in output
        client = MlflowClient("http://127.0.0.1:5000")  # the block's MLFLOW_TRACKING_URI
        client.set_registered_model_alias("distilbert-agnews", "champion", "2")
        champion = root / ".store" / "models" / "distilbert-agnews" / "champion.json"
        deadline = time.monotonic() + 90  # a delivery takes seconds; the receiver's timer, 30 s, if one is lost
        while json.loads(champion.read_text())["version"] != 2:
            assert time.monotonic() < deadline, done.output()[-4000:]
            time.sleep(0.5)
        assert client.get_model_version_by_alias("distilbert-agnews", "previous").version == "1"


@pytest.mark.e2e
@pytest.mark.integration  # trains twice, registers and serves
def test_rollout_as_written_serves_a_canary_then_promotes_it(tmp_path: Path) -> None:
    """The README's "Train and serve locally", then "Rollout" in the same shell."""
    root = checkout(tmp_path)
    with run_as_written("\n".join([readme_sequence("train-and-serve"), readme_sequence("rollout")]), root) as done:
        output = done.output()
    assert done.returncode == 0, output[-4000:]
    assert "distilbert-agnews v2 is @candidate" in output
    assert "@candidate v2 in canary mode answering 50% of the texts" in output
    assert "storage serves v1 with candidate v2 (canary)" in output
    hows = re.findall(r"how: (\w+)", output)
    assert hows[-3:] == ["promote", "canary", "gate"]  # newest first
    pointer = json.loads((root / ".store" / "models" / "distilbert-agnews" / "champion.json").read_text())
    assert pointer["version"] == 2 and "candidate" not in pointer
