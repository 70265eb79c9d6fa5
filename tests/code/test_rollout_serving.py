"""A rollout served by the Lambda (lambda/local.py, a process of its own): a canary answers its share of the texts,
a shadow runs beside the champion without answering, each answer and capture names its version, and a candidate
that can't be served costs no answer."""

from __future__ import annotations

import hashlib
import itertools
import json
import threading
import time
from pathlib import Path

import pytest
from scipy.stats import binom

from agnews.data import parse_csv
from agnews.promotion.mirror import point_to
from agnews.storage import LocalStorage
from bundle.capture import CAPTURES, parse_lines
from bundle.layout import MANIFEST, POINTER, candidate_for, parse_pointer
from tests.helpers import MODEL_NAME, LocalServer, lambda_process, metric_filters, mirror_version, require_agnews

pytestmark = [pytest.mark.integration, pytest.mark.promotion]  # a server process, and 2,000 requests

ROLLOUT = "3f2a9c1e7b00"


def texts(count: int) -> list[str]:
    """``count`` distinct AG News texts (title and description), from the test split."""
    return list(dict.fromkeys(parse_csv(require_agnews() / "test.csv", 4).text))[:count]


def roll_out(root: Path, bundle: Path, mode: str, weight: float, manifest: bytes | None = None) -> None:
    """v2 laid out beside the champion (v1) and served as its candidate, with the mirror's own ``point_to``."""
    folder = mirror_version(bundle, root, 2, champion=False)
    champion = parse_pointer((root / POINTER).read_bytes())
    first = (root / champion.manifest).read_bytes()
    candidate = candidate_for(2, manifest or (folder / MANIFEST).read_bytes(), mode, weight, ROLLOUT)
    point_to(LocalStorage(root), POINTER, MODEL_NAME, 1, first, candidate)


def ask_each(server: LocalServer, questions: list[str]) -> list[dict]:
    answers = []
    for text in questions:
        status, body = server.request(data=json.dumps({"text": text}).encode())
        assert status == 200, body
        answers.append(body)
    return answers


def stored(root: Path) -> list:
    """The capture records in the store that holds ``root`` (``<store>/models/<name>``)."""
    objects = sorted(path for path in (root.parent.parent / CAPTURES / MODEL_NAME).rglob("*") if path.is_file())
    return [record for path in objects for record in parse_lines(path.read_bytes(), str(path))]


def requests_of(printed: list[str]) -> list[dict]:
    return [json.loads(line) for line in printed if line.startswith("{") and '"status"' in line]


def test_a_ten_percent_canary_answers_its_share_and_every_answer_names_its_version(
    mirror_root: Path, tiny_bundle: Path, tmp_path: Path
) -> None:
    roll_out(mirror_root, tiny_bundle, "canary", 0.1)
    questions = texts(2000)
    server = LocalServer(lambda_process(mirror_root, tmp_path))
    try:
        answers = ask_each(server, questions)
    finally:
        printed = server.stop()
    versions = [answer["model_version"] for answer in answers]
    assert set(versions) == {1, 2}
    low, high = binom.interval(0.999, len(questions), 0.1)
    assert low <= versions.count(2) <= high, versions.count(2)
    # the draw is the rollout's stable hash of each text: the same text gets the same version
    candidate = parse_pointer((mirror_root / POINTER).read_bytes()).candidate
    assert candidate is not None
    digests = [hashlib.sha256(text.encode()).hexdigest() for text in questions]
    assert versions == [2 if candidate.answers(digest) else 1 for digest in digests]
    # the captures say which version answered each text
    records = {record.text_sha256: record for record in stored(mirror_root)}
    assert len(records) == len(questions)
    assert [records[digest].model_version for digest in digests] == versions
    assert not any(record.shadow for record in records.values())
    # and so do the metrics: each request's line names the version that answered it, which the by-version metric
    # filters take as a dimension
    lines = requests_of(printed)
    assert [line["version"] for line in lines] == versions
    by_version = [f for f in metric_filters() if "version" in f.dimensions]
    assert {f.metric for f in by_version} == {"Latency", "5XXError"}
    for metric_filter in by_version:
        counted = [line[metric_filter.dimensions["version"]] for line in lines if metric_filter.counts(line)]
        assert counted == versions


def test_a_shadow_runs_on_every_text_and_only_the_champion_answers(
    mirror_root: Path, tiny_bundle: Path, tmp_path: Path
) -> None:
    roll_out(mirror_root, tiny_bundle, "shadow", 0.0)
    questions = texts(200)
    server = LocalServer(lambda_process(mirror_root, tmp_path))
    try:
        answers = ask_each(server, questions)
    finally:
        printed = server.stop()
    assert {answer["model_version"] for answer in answers} == {1}
    records = stored(mirror_root)
    assert len(records) == 2 * len(questions)
    by_text: dict[str, dict[bool, object]] = {}
    for record in records:
        by_text.setdefault(record.text_sha256, {})[record.shadow] = record
    assert len(by_text) == len(questions)
    for text, answer in zip(questions, answers, strict=True):
        pair = by_text[hashlib.sha256(text.encode()).hexdigest()]
        champion, shadow = pair[False], pair[True]
        assert (champion.model_version, shadow.model_version) == (1, 2)
        assert champion.predicted_class == answer["predicted_class"]
        assert champion.request_id == shadow.request_id
    lines = requests_of(printed)
    assert all(line["version"] == 1 and line["shadow_ms"] > 0 for line in lines)


def test_a_candidate_that_cannot_be_loaded_costs_no_answer(
    mirror_root: Path, tiny_bundle: Path, tmp_path: Path
) -> None:
    roll_out(mirror_root, tiny_bundle, "canary", 1.0, manifest=b'{"not": "the manifest"}')
    server = LocalServer(lambda_process(mirror_root, tmp_path))
    try:
        answers = ask_each(server, texts(20))
    finally:
        printed = server.stop()
    assert {answer["model_version"] for answer in answers} == {1}  # a weight of 1, and still the champion
    errors = [json.loads(line) for line in printed if '"level":"ERROR"' in line]
    assert errors and all("candidate 2" in error["message"] for error in errors)
    assert "serving version 1 alone" in errors[0]["message"]


def test_a_candidate_this_lambda_does_not_understand_is_refused_in_one_line(mirror_root: Path, tmp_path: Path) -> None:
    doc = json.loads((mirror_root / POINTER).read_bytes())
    doc["candidate"] = {"version": 2, "mode": "blue-green"}
    (mirror_root / POINTER).write_text(json.dumps(doc))
    server = LocalServer(lambda_process(mirror_root, tmp_path) | {"MODEL_REFRESH_SECONDS": "0"})
    try:
        answers = ask_each(server, texts(5))
    finally:
        printed = server.stop()
    assert {answer["model_version"] for answer in answers} == {1}
    refused = [line for line in printed if "serving version 1 alone" in line]
    assert len(refused) == 1 and "has fields this reader does not know" not in refused[0]
    assert "lacks" in refused[0] or "is not one of" in refused[0]


def test_no_request_fails_while_a_rollout_starts_promotes_and_aborts(
    mirror_root: Path, tiny_bundle: Path, tmp_path: Path
) -> None:
    """Four clients ask without pause while champion.json moves as the rollout steps move it (the mirror's own
    ``point_to``): a canary starts, is promoted, a shadow starts and is aborted. The Lambda re-reads the pointer on
    every request (MODEL_REFRESH_SECONDS=0)."""
    storage = LocalStorage(mirror_root)
    manifests = {1: (mirror_root / parse_pointer((mirror_root / POINTER).read_bytes()).manifest).read_bytes()}
    for version in (2, 3):
        manifests[version] = (mirror_version(tiny_bundle, mirror_root, version, champion=False) / MANIFEST).read_bytes()
    steps = [
        (1, candidate_for(2, manifests[2], "canary", 0.5, ROLLOUT)),  # start
        (2, None),  # promote
        (2, candidate_for(3, manifests[3], "shadow", 0.0, ROLLOUT)),  # start
        (2, None),  # abort
    ]
    server = LocalServer(lambda_process(mirror_root, tmp_path) | {"MODEL_REFRESH_SECONDS": "0"})
    statuses: list[int] = []
    served: list[int] = []
    moving = threading.Event()

    def client() -> None:
        for text in itertools.cycle(texts(50)):
            status, body = server.request(data=json.dumps({"text": text}).encode())
            statuses.append(status)
            served.append(body.get("model_version", 0))
            if not moving.is_set():
                return

    try:
        moving.set()
        clients = [threading.Thread(target=client) for _ in range(4)]
        for thread in clients:
            thread.start()
        for champion, candidate in steps:
            time.sleep(0.5)
            point_to(storage, POINTER, MODEL_NAME, champion, manifests[champion], candidate)
        time.sleep(0.5)
        moving.clear()
        for thread in clients:
            thread.join(timeout=60)
    finally:
        server.stop()
    assert len(statuses) > 40 and set(statuses) == {200}
    assert {1, 2} <= set(served) and 3 not in served and served[-1] == 2  # a shadow never answers
