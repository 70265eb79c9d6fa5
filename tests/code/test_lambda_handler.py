"""The Lambda handler: event shapes and malformed input against a fake store (the adapter alone, no model), then
the real tiny bundle: hostile text, what the model reads of a long text, missing models, settings, logs and
metrics, the command line and the local server."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from agnews.config import PROJECT_ROOT
from bundle.capture import line_digest, parse_line
from bundle.layout import INPUTS, OUTPUT
from bundle.predictor import Predictor, Reading
from tests.helpers import (
    EXISTS,
    LABELS,
    LAMBDA_DIR,
    MODEL_NAME,
    SEED_TEXT,
    LocalServer,
    cache_folder,
    lambda_process,
    lambda_template,
    metric_filters,
    mirror_version,
    stored_folder,
)

PREDICTION_KEYS = {"predicted_class", "confidence", "probabilities", "model_version"}


def v1_event(body: str | None, method: str = "POST", base64_body: bool = False) -> dict:
    """An API Gateway REST API (v1) proxy event."""
    return {
        "resource": "/classify",
        "path": "/classify",
        "httpMethod": method,
        "headers": {"Content-Type": "application/json"},
        "queryStringParameters": None,
        "requestContext": {"resourcePath": "/classify", "httpMethod": method, "stage": "prod"},
        "body": base64.b64encode(body.encode()).decode() if base64_body and body is not None else body,
        "isBase64Encoded": base64_body,
    }


def v2_event(body: str | None, method: str = "POST", base64_body: bool = False) -> dict:
    """An HTTP API (v2) event; a Function URL sends the same shape."""
    return {
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": "/",
        "rawQueryString": "",
        "headers": {"content-type": "application/json"},
        "requestContext": {"http": {"method": method, "path": "/", "sourceIp": "127.0.0.1"}, "stage": "$default"},
        "body": base64.b64encode(body.encode()).decode() if base64_body and body is not None else body,
        "isBase64Encoded": base64_body,
    }


def function_url_event(body: str) -> dict:
    """A Function URL event: v2 shape, with the body base64-encoded."""
    event = v2_event(body, base64_body=True)
    event["requestContext"] |= {"domainName": "abc.lambda-url.us-east-1.on.aws", "domainPrefix": "abc"}
    return event


def check_prediction(body: dict, version: int = 1) -> None:
    """The seed's response body, with probabilities that make sense."""
    assert set(body) == PREDICTION_KEYS
    assert list(body["probabilities"]) == LABELS
    probabilities = body["probabilities"]
    assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    assert body["predicted_class"] == max(probabilities, key=probabilities.get)
    assert body["confidence"] == probabilities[body["predicted_class"]]
    assert body["model_version"] == version


# The event tests: the adapter over a fake store, whose answer depends on the text alone. No bundle, no onnxruntime.
FAKE_VERSION = 7
FAKE_MANIFEST = "f" * 64


class FakePredictor:
    """The predictor's interface; records what it is asked."""

    labels = LABELS

    def __init__(self) -> None:
        self.asked: list[list[str]] = []

    def predict_read(self, texts: list[str]) -> tuple[list[dict], list[Reading]]:
        self.asked.append(texts)
        return [fake_result(text) for text in texts], [Reading(len(text.split()), False) for text in texts]


def fake_result(text: str) -> dict:
    best = LABELS[len(text) % len(LABELS)]
    probabilities = {label: 0.7 if label == best else 0.1 for label in LABELS}
    return {"predicted_class": best, "confidence": 0.7, "probabilities": probabilities}


class FakeStore:
    """The store's interface: the limits, and a model, or ``problem`` raised in its place."""

    def __init__(self, settings, problem: Exception | None = None) -> None:
        self.settings = settings
        self.predictor = FakePredictor()
        self.problem = problem

    def get(self) -> SimpleNamespace:
        if self.problem is not None:
            raise self.problem
        return SimpleNamespace(
            model_name=MODEL_NAME, version=FAKE_VERSION, manifest_sha256=FAKE_MANIFEST, predictor=self.predictor
        )

    def rollout(self) -> None:
        return None


@pytest.fixture
def fake(lambda_module) -> FakeStore:
    return FakeStore(lambda_module.Settings.from_env({}))


@pytest.fixture
def handle(lambda_module, fake: FakeStore):
    """``handle(event)``: the Service over the fake store."""
    service = lambda_module.Service(fake)
    return lambda event: service.handle(event, None)


@pytest.fixture
def invoke(serve, mirror_root: Path):
    """``invoke(event)``: the Lambda's own handler over the real tiny bundle."""
    return serve(mirror_root)


def test_direct_invoke_answers_in_the_seed_format(handle, fake: FakeStore) -> None:
    response = handle({"text": SEED_TEXT})
    assert response == {"statusCode": 200, "body": fake_result(SEED_TEXT) | {"model_version": FAKE_VERSION}}
    check_prediction(response["body"], FAKE_VERSION)
    assert fake.predictor.asked == [[SEED_TEXT]]


def test_batch_asks_the_model_once_and_answers_in_order(handle, fake: FakeStore) -> None:
    texts = [SEED_TEXT, "Oil", "Rain delays the final", "New phone"]
    response = handle({"texts": texts})
    assert response["statusCode"] == 200
    assert response["body"] == [fake_result(text) | {"model_version": FAKE_VERSION} for text in texts]
    assert fake.predictor.asked == [texts]


def test_batch_on_the_real_bundle_returns_one_body_per_text_matching_single_calls(invoke) -> None:
    # more texts than the bundle's batch size, not in order of length: the answers come back in the request's order
    texts = [
        SEED_TEXT,
        "The Lakers beat the Celtics in overtime",
        "UN council meets on the crisis",
        "Oil",
        "Researchers unveiled a chip that trains neural networks with a fraction of the power, the journal reported",
        "Shares of the bank fell 4% after it cut its forecast",
        "Rain delays the final",
        "Ministers from both countries met in Geneva on Monday to discuss a ceasefire along the disputed border",
        "New phone",
    ]
    response = invoke({"texts": texts})
    assert response["statusCode"] == 200
    assert len(response["body"]) == len(texts)
    for text, body in zip(texts, response["body"], strict=True):
        check_prediction(body)
        single = invoke({"text": text})["body"]
        for label in LABELS:
            assert body["probabilities"][label] == pytest.approx(single["probabilities"][label], abs=0.02)


@pytest.mark.parametrize(
    "make_event",
    [
        pytest.param(lambda body: v1_event(body), id="rest-v1"),
        pytest.param(lambda body: v1_event(body, base64_body=True), id="rest-v1-base64"),
        pytest.param(lambda body: v2_event(body), id="http-api-v2"),
        pytest.param(function_url_event, id="function-url"),
    ],
)
def test_http_events_get_a_proxy_response(handle, fake: FakeStore, make_event) -> None:
    direct = handle({"text": SEED_TEXT})["body"]
    response = handle(make_event(json.dumps({"text": SEED_TEXT})))
    assert response["statusCode"] == 200
    assert response["headers"] == {"Content-Type": "application/json"}
    assert response["isBase64Encoded"] is False
    assert isinstance(response["body"], str)
    assert json.loads(response["body"]) == direct
    assert fake.predictor.asked == [[SEED_TEXT], [SEED_TEXT]]


def test_get_names_the_model_version(handle, fake: FakeStore) -> None:
    response = handle(v2_event(None, method="GET"))
    assert response["statusCode"] == 200
    assert json.loads(response["body"]) == {"model_version": FAKE_VERSION, "labels": LABELS}
    assert fake.predictor.asked == []


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "TRACE", ""])
@pytest.mark.parametrize("make_event", [v1_event, v2_event], ids=["v1", "v2"])
def test_unknown_methods_get_405(handle, fake: FakeStore, make_event, method: str) -> None:
    response = handle(make_event(json.dumps({"text": SEED_TEXT}), method=method))
    assert response["statusCode"] == 405
    assert response["headers"]["Allow"] == "GET, POST"
    assert "method not allowed" in json.loads(response["body"])["error"]
    assert fake.predictor.asked == []


BIG = 200_000  # MAX_TEXT_CHARS's default, from lambda/settings.py
MALFORMED = [
    # (event, message fragment); direct invokes, then HTTP events
    (None, "not null"),
    ("just a string", "not a string"),
    (42, "not a number"),
    (3.5, "not a number"),
    (True, "not a boolean"),
    ([{"text": "a"}], "not an array"),
    ({}, 'missing "text"'),
    ({"txt": "typo"}, 'missing "text"'),
    ({"text": None}, '"text" must be a string, not null'),
    ({"text": 7}, '"text" must be a string, not a number'),
    ({"text": ["a"]}, '"text" must be a string, not an array'),
    ({"text": {"a": 1}}, '"text" must be a string, not an object'),
    ({"text": False}, '"text" must be a string, not a boolean'),
    ({"text": ""}, '"text" is empty'),
    ({"text": "   \n\t "}, '"text" is only whitespace'),
    ({"text": "\u3000\u2003"}, '"text" is only whitespace'),
    ({"text": "x" * (BIG + 1)}, f'"text" has {BIG + 1} characters; the most is {BIG}'),
    ({"text": "bad \ud800 surrogate"}, "unpaired surrogate at character 4"),
    ({"texts": []}, '"texts" is empty'),
    ({"texts": "one text"}, '"texts" must be a list of strings, not a string'),
    ({"texts": None}, '"texts" must be a list of strings, not null'),
    ({"texts": {"0": "a"}}, '"texts" must be a list of strings, not an object'),
    ({"texts": ["ok"] * 65}, '"texts" has 65 items; the most is 64'),
    ({"texts": ["ok", 3]}, '"texts"[1] must be a string, not a number'),
    ({"texts": ["ok", None]}, '"texts"[1] must be a string, not null'),
    ({"texts": [["nested"]]}, '"texts"[0] must be a string, not an array'),
    ({"texts": ["ok", ""]}, '"texts"[1] is empty'),
    ({"texts": [" "]}, '"texts"[0] is only whitespace'),
    ({"texts": ["ok", "y" * (BIG + 1)]}, f'"texts"[1] has {BIG + 1} characters'),
    ({"text": "a", "texts": ["b"]}, 'either "text" or "texts", not both'),
    (v2_event("{not json"), "not valid JSON: Expecting property name"),
    (v2_event('{"text": "a"'), "not valid JSON"),
    (v2_event(""), "the request body is empty"),
    (v2_event(None), "the request body is empty"),
    (v1_event("[1, 2]"), "not an array"),
    (v1_event('"text"'), "not a string"),
    (v1_event("null"), "not null"),
    (v2_event("{}"), 'missing "text"'),
    (v2_event('{"text": 1}'), '"text" must be a string, not a number'),
    (v2_event('{"texts": []}'), '"texts" is empty'),
    (v2_event('{"text": "a", "texts": ["b"]}'), "not both"),
    (v2_event("[" * 100_000 + "]" * 100_000), "nested too deeply"),
    (v2_event("%%% not base64 %%%") | {"isBase64Encoded": True}, "not valid base64"),
    (v2_event(base64.b64encode(b'{"text": "\xff\xfe"}').decode()) | {"isBase64Encoded": True}, "not valid UTF-8"),
    (v2_event('{"text": "x"}') | {"body": {"text": "x"}}, "body must be a string, not an object"),
    (v1_event('{"text": "\\ud800"}'), "unpaired surrogate"),
    # more digits than Python turns into an int (4,300): json.loads raises a ValueError that is no JSONDecodeError
    (v2_event('{"text": ' + "9" * 4301 + "}"), "a number with too many digits"),
    (v1_event('{"texts": ["a", -' + "1" * 100_000 + "]}"), "a number with too many digits"),
]


@pytest.mark.parametrize(("event", "message"), MALFORMED, ids=[f"malformed-{i}" for i in range(len(MALFORMED))])
def test_malformed_events_get_400_with_a_reason(handle, fake: FakeStore, event: object, message: str) -> None:
    response = handle(event)
    assert response["statusCode"] == 400
    body = json.loads(response["body"]) if "headers" in response else response["body"]
    assert set(body) == {"error"}
    assert message in body["error"]
    assert fake.predictor.asked == []


HOSTILE = {
    "emoji": "Stocks 🚀📈 soar as 🍎 beats estimates 👏🏽👨‍👩‍👧",
    "rtl": "ارتفعت أسهم أبل بعد إعلان الأرباح — השוק עלה",
    "combining": "Z\u0361\u035co\u0336\u0358n\u0334\u0301g\u0335 markets" + "\u0301" * 500,
    "nul-bytes": "Apple\x00 earnings\x00\x00 up",
    "only-nul": "\x00",
    "control": "\x1b[31mred\x1b[0m \u202e reversed \ufeff bom",
    "100kB": ("Apple reported strong quarterly earnings. " * 2400)[:100_000],
    "html": '<script>alert("x")</script><img src=x onerror=alert(1)> <b>Apple</b> earnings',
}


@pytest.mark.parametrize("text", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_text_is_classified_by_the_real_bundle(invoke, text: str) -> None:
    for response in (invoke({"text": text}), invoke(v2_event(json.dumps({"text": text})))):
        assert response["statusCode"] == 200
    check_prediction(json.loads(response["body"]))
    assert "<" not in response["body"]


def test_html_is_never_echoed(handle) -> None:
    script = "<script>alert(1)</script>"
    for event in (
        v2_event(json.dumps({"text": script * (BIG // len(script) + 1)})),
        v2_event(json.dumps({"texts": [script, 5]})),
        v2_event(script),
        v1_event(json.dumps({"text": script}), method="<script>"),
    ):
        response = handle(event)
        assert response["statusCode"] in (400, 405)
        assert "<" not in response["body"]


def test_a_store_without_a_model_gives_503_after_checking_the_input(lambda_module) -> None:
    store = FakeStore(lambda_module.Settings.from_env({}), lambda_module.NoModelError("champion.json is gone"))
    service = lambda_module.Service(store)
    response = service.handle(v2_event(json.dumps({"text": SEED_TEXT})), None)
    assert response["statusCode"] == 503
    assert json.loads(response["body"]) == {"error": "no model available: champion.json is gone"}
    assert json.loads(service.handle(v2_event(None, method="GET"), None)["body"])["error"].startswith("no model")
    assert service.handle({"text": ""}, None)["statusCode"] == 400


def test_an_unexpected_error_gives_500_and_is_logged(lambda_module, caplog: pytest.LogCaptureFixture) -> None:
    store = FakeStore(lambda_module.Settings.from_env({}), RuntimeError("a bug"))
    service = lambda_module.Service(store)
    with caplog.at_level(logging.ERROR, logger="agnews"):
        direct = service.handle({"text": SEED_TEXT}, None)
        http = service.handle(v1_event(json.dumps({"text": SEED_TEXT})), None)
    assert direct == {"statusCode": 500, "body": {"error": "internal error"}}
    assert http["statusCode"] == 500
    assert json.loads(http["body"]) == {"error": "internal error"}
    assert [r.exc_info[1] for r in caplog.records if r.exc_info] == [store.problem, store.problem]


def test_limits_come_from_the_settings(lambda_module) -> None:
    store = FakeStore(lambda_module.Settings.from_env({"MAX_TEXT_CHARS": "10", "MAX_BATCH": "2"}))
    handle = lambda_module.Service(store).handle
    assert handle({"text": "x" * 10}, None)["statusCode"] == 200
    assert handle({"texts": ["a", "b"]}, None)["statusCode"] == 200
    assert (
        handle({"text": "x" * 11}, None)["body"]["error"] == '"text" has 11 characters; the most is 10 (MAX_TEXT_CHARS)'
    )
    assert handle({"texts": ["a", "b", "c"]}, None)["body"]["error"] == '"texts" has 3 items; the most is 2 (MAX_BATCH)'
    assert store.predictor.asked == [["x" * 10], ["a", "b"]]


# What the model reads of a long text: a cut of it, tokenized, gives the tokens that the whole text gives.
@pytest.fixture(scope="module")
def predictor(tiny_bundle: Path) -> Predictor:
    return Predictor(tiny_bundle)


def uncut_logits(predictor: Predictor, text: str) -> np.ndarray:
    """The logits of ``text`` as the model read it before texts were cut: all of it tokenized, then truncated."""
    encoding = predictor.tokenizer.encode(text)
    ids, mask = (np.array([values], dtype=np.int64) for values in (encoding.ids, encoding.attention_mask))
    return predictor.session.run([OUTPUT], dict(zip(INPUTS, (ids, mask), strict=True)))[0]


ARTICLE = " ".join(
    [
        "Ministers from both countries met in Geneva on Monday to discuss a ceasefire along the disputed border.",
        "Shares of the bank fell 4% after it cut its forecast, citing weaker lending and higher provisions.",
        "Researchers unveiled a chip that trains neural networks with a fraction of the power, the journal said.",
        "The Lakers beat the Celtics 112-108 in overtime, with 41 points from their captain.",
    ]
    * 300
)
LONG_TEXTS = {
    "article": ARTICLE,
    "100kB": HOSTILE["100kB"],
    "cjk": "東京株式市場で日経平均株価が続伸した。" * 500,
    "combining": ("Zo\u0301e\u0300 markets\u0301\u0301 " * 3000),
    "emoji": "Stocks 🚀📈 soar as 🍎 beats estimates 👏🏽 " * 2000,
    "a!": "a!" * 100_000,
    "words-of-14": "international " * 2000,  # 14 characters a token: the first cut is too short, its double is not
}


@pytest.mark.parametrize("text", LONG_TEXTS.values(), ids=LONG_TEXTS.keys())
def test_a_long_text_is_read_as_its_cut_which_is_short(predictor: Predictor, text: str) -> None:
    cut = predictor.cut(text)
    assert len(cut) <= predictor.most_chars < len(text)
    assert predictor.tokenizer.encode(cut).ids == predictor.tokenizer.encode(text).ids
    np.testing.assert_array_equal(predictor.logits([text]), uncut_logits(predictor, text))
    np.testing.assert_array_equal(predictor.logits([text]), predictor.logits([cut]))


def test_a_text_is_cut_to_the_first_prefix_read_the_same(predictor: Predictor) -> None:
    assert predictor.cut(LONG_TEXTS["a!"]) == LONG_TEXTS["a!"][: predictor.first_cut]
    assert predictor.cut(LONG_TEXTS["words-of-14"]) == LONG_TEXTS["words-of-14"][: 2 * predictor.first_cut]


FITTING = {
    "seed": SEED_TEXT,
    "spaced": "Oil " + " " * 3000 + "prices rose",
    "lines": "Markets " + "\n" * 2000 + "closed higher " + "\t" * 1500 + "on Friday",
    "tail-of-spaces": "word " * 100 + " " * 3500,
    "long-words": ("supercalifragilistic" * 6 + " ") * 25,  # of 120 letters: one [UNK] each
}


@pytest.mark.parametrize("text", FITTING.values(), ids=FITTING.keys())
def test_cutting_never_changes_a_text_that_the_model_reads_whole(predictor: Predictor, text: str) -> None:
    assert not predictor.tokenizer.encode(text).overflowing  # the model reads all of it
    assert len(text) <= predictor.most_chars
    assert predictor.cut(text) == text


BUILT_TO_COST = {
    "spaces-then-dense": " " * 100_000 + "a!" * 50_000,
    "unknown-words": ("b" * 101 + " ") * 1900,  # a word of more than 100 characters is one [UNK]
    "only-spaces-then-a-word": " " * 199_990 + "earnings",
}


@pytest.mark.parametrize("text", BUILT_TO_COST.values(), ids=BUILT_TO_COST.keys())
def test_the_work_on_any_text_is_bounded_by_what_the_model_reads(predictor: Predictor, text: str) -> None:
    """Texts built so that no short prefix is read as the whole text is: the cut stops at ``most_chars`` anyway (and
    what the model reads of them may differ from what it would read of all of them: they are not text)."""
    assert len(predictor.cut(text)) == predictor.most_chars
    assert predictor.most_chars == 32 * 128  # MOST_CHARS_PER_TOKEN times the tiny bundle's max_length


# The request's line: its log fields, the fields that the template's metric filters make metrics of, and capture
# records, in one JSON line on stdout, where Lambda sends it to CloudWatch Logs; other log lines (a load, errors) are
# JSON too, with a message.
def printed(out: str) -> tuple[list[dict], list[dict]]:
    """The other JSON log lines, and the requests' lines (with their further predictions' lines)."""
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return [line for line in lines if "message" in line], [line for line in lines if "message" not in line]


SERVICE_METRICS = {"Latency": "Milliseconds", "Texts": "Count", "4XXError": "Count", "5XXError": "Count"}
# Each metric with the unit and the one dimension it has had since it was first extracted
METRICS = {name: (unit, "service") for name, unit in SERVICE_METRICS.items()}
METRICS |= {"ModelSwaps": ("Count", "service"), "Predictions": ("Count", "predicted_class")}


def service_filters() -> list:
    """The template's metric filters of the metrics as they were extracted before rollouts (by service, and
    predicted class): not the by-version ones, nor the candidate's failures (tests/code/test_rollout_serving.py)."""
    return [f for f in metric_filters() if "version" not in f.dimensions and f.metric != "CandidateFailures"]


def metrics_of(lines: list[dict]) -> dict[str, float]:
    """Each metric's total over ``lines``, as the template's metric filters take them (by name, ``Predictions`` by
    predicted class): a filter takes its value from each line that holds the fields its pattern selects."""
    totals: dict[str, float] = {}
    for metric_filter in service_filters():
        unit, dimension = METRICS[metric_filter.metric]
        assert (metric_filter.unit, list(metric_filter.dimensions)) == (unit, [dimension])
        for line in filter(metric_filter.counts, lines):
            label = line[metric_filter.dimensions[dimension]]
            assert dimension != "service" or label == "agnews"
            key = f"{metric_filter.metric}:{label}" if dimension == "predicted_class" else metric_filter.metric
            totals[key] = totals.get(key, 0) + line[metric_filter.value]
    return totals


def test_each_metric_filter_finds_its_fields_in_the_lines_the_handler_prints(
    serve, mirror_root: Path, tiny_bundle: Path, lambda_module, capsys: pytest.CaptureFixture[str]
) -> None:
    """Every metric filter of the template against the lines that the handler prints for the requests it counts:
    each holds the fields that the filter's pattern selects, a number where it reads the value and a string where it
    reads a dimension. The patterns ask only that their fields exist (CloudWatch applies them; this checks that the
    lines have what they name). The tiny model gives every text one class: a fake predictor gives a batch four."""
    invoke = serve(mirror_root, MODEL_REFRESH_SECONDS="0")
    several = lambda_module.Service(FakeStore(lambda_module.Settings.from_env({}))).handle  # a class by length
    gone = FakeStore(lambda_module.Settings.from_env({}), lambda_module.NoModelError("gone"))
    cases = {
        "one text": (invoke, {"text": SEED_TEXT}),
        "batch": (several, {"texts": ["a", "bb", "ccc", "dddd", "eeeee"]}),
        "400": (invoke, {"text": ""}),
        "503": (lambda_module.Service(gone).handle, {"text": SEED_TEXT}),
        "swap": (invoke, {"text": SEED_TEXT}),
    }
    lines = {}
    for case, (handle, event) in cases.items():
        if case == "swap":
            mirror_version(tiny_bundle, mirror_root, 2)  # a promotion: the next request swaps
        capsys.readouterr()
        handle(event, SimpleNamespace(aws_request_id=case))
        lines[case] = printed(capsys.readouterr().out)[1]
    assert [len(case_lines) for case_lines in lines.values()] == [1, 4, 1, 1, 1]  # the batch: a line per class
    everything = [line for case_lines in lines.values() for line in case_lines]
    requests = [case_lines[0] for case_lines in lines.values()]

    filters = {metric_filter.metric: metric_filter for metric_filter in service_filters()}
    assert filters.keys() == METRICS.keys()
    assert lambda_template()["Parameters"]["MetricsNamespace"]["Default"] == "agnews"
    for name, metric_filter in filters.items():
        assert metric_filter.log_group == {"Ref": "ClassifierLogGroup"}
        assert metric_filter.namespace == {"Ref": "MetricsNamespace"}
        assert EXISTS.fullmatch(metric_filter.pattern), metric_filter.pattern
        # CloudWatch takes a value or a dimension only from a field that the pattern matched
        assert {metric_filter.value, *metric_filter.dimensions.values()} <= metric_filter.selected
        counted = [line for line in everything if metric_filter.counts(line)]
        for line in counted:
            value = line[metric_filter.value]
            assert isinstance(value, int | float) and not isinstance(value, bool) and value >= 0, (name, line)
            assert all(isinstance(line[field], str) and line[field] for field in metric_filter.dimensions.values())
        if name in SERVICE_METRICS:  # every request's line, whatever its status
            assert counted == requests
        elif name == "ModelSwaps":
            assert counted == lines["swap"]
        else:  # the texts answered, by class: the batch's further classes in lines of their own
            assert counted == [*lines["one text"], *lines["batch"], *lines["swap"]]
    assert metrics_of(lines["batch"]) == {
        "Latency": lines["batch"][0]["ms"],
        "Texts": 5,
        "4XXError": 0,
        "5XXError": 0,
        **{"Predictions:Business": 1, "Predictions:Sci/Tech": 1, "Predictions:Sports": 2, "Predictions:World": 1},
    }


def test_each_request_writes_one_line_with_its_log_fields_metrics_and_captures(
    serve, mirror_root: Path, tiny_bundle: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    invoke = serve(mirror_root, MODEL_REFRESH_SECONDS="0")

    def handle(event: object, request_id: str) -> tuple[dict, dict, list[dict], dict[str, float]]:
        capsys.readouterr()
        response = invoke(event, SimpleNamespace(aws_request_id=request_id))
        logs, blobs = printed(capsys.readouterr().out)
        assert all(log["request_id"] == request_id for log in logs)
        line, *more = blobs
        assert line["request_id"] == request_id
        assert all(set(blob) == {"class", "predictions"} for blob in more)
        return response, line, logs, metrics_of(blobs)

    texts = [SEED_TEXT, "The Lakers beat the Celtics in overtime", "Oil prices rose"]
    response, line, logs, metrics = handle(v2_event(json.dumps({"texts": texts})), "req-1")
    assert response["statusCode"] == 200
    manifest = hashlib.sha256((stored_folder(mirror_root, 1) / "manifest.json").read_bytes()).hexdigest()
    assert "level" not in line  # INFO, as Lambda reads a line without one
    assert (line["status"], line["service"], line["request_id"]) == (200, "agnews", "req-1")
    assert (line["model"], line["version"], line["manifest"]) == (MODEL_NAME, 1, line_digest(manifest))
    assert any(log["message"].startswith("serving version 1") for log in logs)  # the load, in this request
    answers = json.loads(response["body"])
    predicted = [body["predicted_class"] for body in answers]
    assert metrics == {
        "Latency": line["ms"],
        "Texts": 3,
        "4XXError": 0,
        "5XXError": 0,
        **{f"Predictions:{label}": predicted.count(label) for label in set(predicted)},
    }
    records = parse_line(json.dumps(line))
    assert [record.predicted_class for record in records] == predicted
    assert [record.text_sha256 for record in records] == [hashlib.sha256(t.encode()).hexdigest() for t in texts]
    assert {(record.request_id, record.manifest_sha256) for record in records} == {("req-1", manifest)}
    assert all(record.text is None for record in records)

    response, line, _, metrics = handle({"text": ""}, "req-2")
    assert response["statusCode"] == 400
    assert (line["status"], line["problem"]) == (400, '"text" is empty')
    assert "version" not in line  # no model answered
    assert "captures" not in line
    assert (metrics["4XXError"], metrics["5XXError"], metrics["Texts"]) == (1, 0, 0)

    mirror_version(tiny_bundle, mirror_root, 2)  # a promotion: the next request swaps
    response, line, _, metrics = handle({"text": SEED_TEXT}, "req-3")
    assert (response["body"]["model_version"], line["version"]) == (2, 2)
    assert metrics["ModelSwaps"] == 1
    response, _, _, metrics = handle({"text": SEED_TEXT}, "req-4")
    assert "ModelSwaps" not in metrics


def test_a_503_counts_as_a_5xx_error(lambda_module, capsys: pytest.CaptureFixture[str]) -> None:
    store = FakeStore(lambda_module.Settings.from_env({}), lambda_module.NoModelError("gone", "s3://secret/champion"))
    capsys.readouterr()
    response = lambda_module.Service(store).handle({"text": SEED_TEXT}, SimpleNamespace(aws_request_id="r"))
    assert response == {"statusCode": 503, "body": {"error": "no model available: gone"}}
    logs, blobs = printed(capsys.readouterr().out)
    assert logs == []
    assert [(line["level"], line["problem"]) for line in blobs] == [("WARN", "s3://secret/champion")]
    assert metrics_of(blobs) | {"Latency": 0} == {"Latency": 0, "Texts": 0, "4XXError": 0, "5XXError": 1}


# A process that has only the standard library, lambda/ and the project root: a Service over a fake needs no more.
TORCH_FREE_PROBE = """
import json, sys
sys.path[:0] = sys.argv[1:3]
import handler
from settings import Settings

class Predictor:
    labels = ["World", "Sports"]
    def predict_read(self, texts):
        answer = {"predicted_class": "World", "confidence": 0.9, "probabilities": {"World": 0.9, "Sports": 0.1}}
        return [answer for _ in texts], [(3, False) for _ in texts]

class Model:
    model_name = "m"
    version = 3
    manifest_sha256 = "0" * 64
    predictor = Predictor()

class Store:
    settings = Settings.from_env({})
    def get(self):
        return Model()
    def rollout(self):
        return None

service = handler.Service(Store())
events = [{"text": "x"}, {"texts": ["x", "y"]}, {"text": ""}, {"httpMethod": "GET"}, {"httpMethod": "PUT"}]
answers = [service.handle(event, None) for event in events]
heavy = {"torch", "transformers", "onnxruntime", "numpy", "tokenizers", "model_store", "boto3", "aws_lambda_powertools"}
loaded = {m.split(".")[0] for m in sys.modules}
print(json.dumps({"answers": answers, "loaded": sorted(loaded & heavy)}))
"""


def test_event_handling_needs_no_model_dependencies() -> None:
    """The standard library only: no torch, not even onnxruntime, numpy or tokenizers, and no Powertools."""
    env = {name: value for name, value in os.environ.items() if name != "AWS_LAMBDA_FUNCTION_NAME"}
    done = subprocess.run(
        [sys.executable, "-I", "-c", TORCH_FREE_PROBE, str(LAMBDA_DIR), str(PROJECT_ROOT)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    probe = json.loads(done.stdout.splitlines()[-1])  # after the logs and metrics
    assert [answer["statusCode"] for answer in probe["answers"]] == [200, 200, 400, 200, 405]
    assert probe["answers"][0]["body"]["model_version"] == 3
    assert probe["loaded"] == []


def test_no_model_gives_503_with_a_short_reason_and_logs_the_details(
    serve, tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    invoke = serve(tmp_path / "nothing-here")
    capsys.readouterr()
    with caplog.at_level(logging.INFO, logger="agnews"):
        response = invoke(v2_event(json.dumps({"text": SEED_TEXT})))
    assert response["statusCode"] == 503
    # the caller learns that there is no model, not where the store is
    assert json.loads(response["body"]) == {"error": "no model available: the model store could not be read"}
    assert str(tmp_path) not in response["body"]
    details = f"cannot read {tmp_path / 'nothing-here' / 'champion.json'}: No such file or directory"
    assert f"no model to serve: {details}" in caplog.messages  # the store's attempt
    _, (line,) = printed(capsys.readouterr().out)
    assert (line["level"], line["status"], line["problem"]) == ("WARN", 503, details)
    assert invoke({"text": ""})["statusCode"] == 400  # input is still checked first


NO_MODEL = (
    "no model available: no model configured: set MODEL_URI, or S3_BUCKET and MODEL_PREFIX "
    "(<storage.model_prefix>/<registry.model_name>, e.g. models/distilbert-agnews)"
)


@pytest.mark.parametrize(
    "env",
    [{}, {"S3_BUCKET": "models-bucket"}, {"MODEL_PREFIX": "models/distilbert-agnews"}, {"MODEL_URI": ""}],
    ids=["nothing", "bucket-without-prefix", "prefix-without-bucket", "empty-uri"],
)
def test_no_model_configured_gives_503_saying_what_to_set(lambda_module, env: dict[str, str]) -> None:
    import model_store  # lambda/'s, imported with the handler

    store = model_store.ModelStore(lambda_module.Settings.from_env(env))
    response = lambda_module.Service(store).handle({"text": SEED_TEXT}, None)
    assert response == {"statusCode": 503, "body": {"error": NO_MODEL}}


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("MAX_BATCH", "many", "MAX_BATCH='many' is not a number"),
        ("MAX_TEXT_CHARS", "0", "MAX_TEXT_CHARS='0' must be at least 1"),
        ("MODEL_REFRESH_SECONDS", "-1", "MODEL_REFRESH_SECONDS='-1' must be at least 0"),
    ],
)
def test_bad_settings_give_500_naming_the_variable(
    lambda_module, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str, value: str, message
) -> None:
    """The container's own handler, configured by the environment: its store cannot be built (so none is kept), and
    each request answers 500."""
    for variable, setting in {"MODEL_URI": str(tmp_path / "model"), name: value}.items():
        monkeypatch.setenv(variable, setting)
    expected = {"error": f"configuration error: {message}"}
    assert lambda_module.lambda_handler({"text": SEED_TEXT}, None) == {"statusCode": 500, "body": expected}
    # a configuration error comes first, whatever the event
    response = lambda_module.lambda_handler(v2_event(None, method="DELETE"), None)
    assert (response["statusCode"], json.loads(response["body"])) == (500, expected)


def last_line(stdout: str) -> object:
    """What a probe printed last, after the handler's JSON logs and metrics."""
    return json.loads(stdout.splitlines()[-1])


def test_in_lambda_the_model_loads_while_the_handler_is_imported(mirror_root: Path, tmp_path: Path) -> None:
    env = lambda_process(mirror_root, tmp_path) | {"AWS_LAMBDA_FUNCTION_NAME": "agnews", "PYTHONPATH": str(LAMBDA_DIR)}
    probe = "import json, os, sys, handler; print(json.dumps(sorted(os.listdir(sys.argv[1]))))"
    cached = cache_folder(tmp_path / "cache", mirror_root, mirror_root, 1)
    done = subprocess.run([sys.executable, "-c", probe, str(cached)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert last_line(done.stdout) == ["config.json", "model.int8.onnx", "tokenizer.json"]
    # a bad setting does not fail the init phase: each request answers 500 with the reason
    probe = "import json, handler; print(json.dumps(handler.lambda_handler({'text': 'x'}, None)))"
    done = subprocess.run([sys.executable, "-c", probe], env=env | {"MAX_BATCH": "0"}, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    error = "configuration error: MAX_BATCH='0' must be at least 1"
    assert last_line(done.stdout) == {"statusCode": 500, "body": {"error": error}}


def test_command_line_prints_the_prediction_without_torch(mirror_root: Path, tmp_path: Path) -> None:
    env = lambda_process(mirror_root, tmp_path)
    done = subprocess.run(
        [sys.executable, str(LAMBDA_DIR / "handler.py"), SEED_TEXT], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    check_prediction(json.loads(done.stdout))
    probe = (
        "import json, sys, handler; handler.lambda_handler({'text': 'x'}, None); "
        "heavy = {'torch', 'transformers', 'steps', 'agnews'}; "
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & heavy)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], env=env | {"PYTHONPATH": str(LAMBDA_DIR)}, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert last_line(done.stdout) == []


def test_command_line_without_a_model_exits_1(tmp_path: Path) -> None:
    env = lambda_process(tmp_path / "none", tmp_path)
    done = subprocess.run([sys.executable, str(LAMBDA_DIR / "handler.py"), "text"], env=env, capture_output=True)
    assert done.returncode == 1
    assert json.loads(done.stdout)["error"].startswith("no model available")
    # the JSON logs and metrics go to stderr, which says what went wrong
    assert f"cannot read {tmp_path / 'none' / 'champion.json'}" in done.stderr.decode()


@pytest.fixture
def local_server(mirror_root: Path, tmp_path: Path):
    server = LocalServer(lambda_process(mirror_root, tmp_path))
    yield server
    server.stop()


def test_local_server_answers_real_http(local_server: LocalServer) -> None:
    status, body = local_server.request(data=json.dumps({"text": SEED_TEXT}).encode())
    assert status == 200
    check_prediction(body)
    for method, data, expected in (("POST", b"{oops", 400), ("DELETE", None, 405), ("GET", None, 200)):
        status, body = local_server.request(method, data)
        assert status == expected
        assert "error" in body if expected != 200 else body["model_version"] == 1
    # each request is logged with a request id of its own, as in Lambda
    logs = [json.loads(line) for line in local_server.stop() if '"status":' in line]
    assert [log["status"] for log in logs] == [200, 400, 405, 200]
    assert len({log["request_id"] for log in logs}) == 4


def listen_backlog(port: int) -> int:
    """The backlog of the socket listening on ``port``, as ``ss`` reports it (Send-Q of a listening socket)."""
    done = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True, check=True)
    (line,) = done.stdout.splitlines()
    return int(line.split()[2])


def test_local_server_answers_16_concurrent_requests(local_server: LocalServer) -> None:
    texts = [f"{SEED_TEXT} ({i})" for i in range(16)]
    start = threading.Barrier(16)

    def ask(text: str) -> tuple[int, dict]:
        start.wait()  # all 16 connect at once
        return local_server.request(data=json.dumps({"text": text}).encode())

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, texts))
    assert [status for status, _ in answers] == [200] * 16, (answers, local_server.stop())
    for _, body in answers:
        check_prediction(body)
    # the kernel queues as many connections as a load test opens, where http.server's backlog of 5 made the rest
    # retry their SYN after a second or more
    if shutil.which("ss"):
        assert listen_backlog(int(local_server.url.rsplit(":", 1)[1])) >= 1024


def test_local_server_refuses_a_body_over_its_limit_with_413_before_reading_it(local_server: LocalServer) -> None:
    port = int(local_server.url.rsplit(":", 1)[1])
    for length in (6 * 1024 * 1024 + 1, 10**12):  # Lambda's 6 MiB, and a length no body will ever reach
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            head = f"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: {length}\r\n\r\n"
            sock.sendall(head.encode() + b'{"text": "')  # the start of a body; the rest never comes
            status_line = sock.makefile("rb").readline()
        assert status_line.split()[1] == b"413", status_line
    assert local_server.request(data=json.dumps({"text": SEED_TEXT}).encode())[0] == 200  # and it still serves
