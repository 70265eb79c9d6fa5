"""Capture: the record the Lambda keeps of each answer (bundle/capture.py), in the request's one line on stdout, and
the way it goes to storage: lambda/local.py into the store it serves from, and the template's log group ->
subscription filter -> Firehose -> S3 on the moto server, as far as moto goes."""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import re
import socket
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import boto3
import pytest

from bundle.capture import CAPTURES, line_digest, object_prefix, parse_line, parse_lines
from bundle.layout import ContractError
from tests.helpers import (
    LAMBDA_DIR,
    MODEL_NAME,
    SEED_TEXT,
    LocalServer,
    free_port,
    lambda_process,
    stored_folder,
    template_resources,
    upload_tree,
)

ONE_MORE = "Scientists mapped the genome of a rare orchid"
TEXTS = [SEED_TEXT, "The Lakers beat the Celtics in overtime", "Oil prices rose as supply fell", "Rain delays final"]
# The request's line for one text without the text (docs/capture.md has what it holds, byte by byte).
ONE_TEXT_LINE_BYTES = 600


def lines_of(out: str) -> list[dict]:
    """The requests' lines among what the handler printed (the other log lines have a message)."""
    return [json.loads(line) for line in out.splitlines() if line.startswith("{") and '"status"' in line]


def one_request(invoke, capsys: pytest.CaptureFixture[str], event: dict) -> tuple[dict, dict]:
    capsys.readouterr()
    response = invoke(event, SimpleNamespace(aws_request_id=str(uuid.uuid4())))
    line, *_ = lines_of(capsys.readouterr().out)
    return response, line


# The schema: strict parsing, as the monitoring step reads these lines.
def good_line() -> dict:
    return {
        "level": "INFO",
        "request_id": "r-1",
        "status": 200,
        "model": MODEL_NAME,
        "version": 3,
        "manifest": line_digest("a" * 64),
        "ms": 4.5,
        "time": 1_796_000_000_000,
        CAPTURES: [
            {
                "class": "Sports",
                "p": {"World": 0.1, "Sports": 0.7, "Business": 0.1, "Sci/Tech": 0.1},
                "tokens": 12,
                "cut": False,
                "text_sha256": line_digest(hashlib.sha256(b"x").hexdigest()),
            }
        ],
    }


def test_a_line_parses_into_one_record_per_entry() -> None:
    line = good_line()
    line[CAPTURES].append(line[CAPTURES][0] | {"text": "x", "cut": True})
    first, second = parse_line(json.dumps(line))
    assert (first.model_name, first.model_version, first.manifest_sha256) == (MODEL_NAME, 3, "a" * 64)
    assert (first.predicted_class, first.confidence, first.tokens, first.cut) == ("Sports", 0.7, 12, False)
    assert (first.request_id, first.latency_ms, first.text) == ("r-1", 4.5, None)
    assert first.time == datetime.fromtimestamp(1_796_000_000, UTC)
    assert (second.text, second.cut) == ("x", True)
    assert parse_line(json.dumps({"level": "INFO", "status": 400})) == []  # a log line without captures


def broken(change) -> str:
    line = good_line()
    change(line, line[CAPTURES][0])
    return json.dumps(line)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("[]", "is not a JSON object"),
        ("{oops", "is not valid JSON"),
        (broken(lambda line, e: line.pop("time")), "lacks 'time'"),
        (broken(lambda line, e: line.update(time="now")), "'time' is str"),
        (broken(lambda line, e: line.update(time=1.5e12)), "'time' is float"),
        (broken(lambda line, e: line.update(time=-1)), "'time' -1 is not milliseconds since the epoch"),
        (broken(lambda line, e: line.update(time=10**30)), "is not milliseconds since the epoch"),
        (broken(lambda line, e: line.update(version=True)), "'version' must not be a boolean"),
        (broken(lambda line, e: line.update(ms=float("nan"))), "'ms' nan is not a duration"),
        (broken(lambda line, e: line.update(ms=-1)), "'ms' -1 is not a duration"),
        (broken(lambda line, e: line.update(version=0)), "is not a version number"),
        (
            broken(lambda line, e: line.update(manifest="abc")),
            "'manifest' is not a sha256 digest in unpadded base64url",
        ),
        (broken(lambda line, e: line.update(manifest="a" * 64)), "'manifest' is not a sha256 digest"),  # hex
        (broken(lambda line, e: line.update(request_id=5)), "'request_id' is int"),
        (broken(lambda line, e: line.update(captures={})), "'captures' is dict"),
        (broken(lambda line, e: e.update({"class": "Weather"})), "not among the labels of 'p'"),
        (broken(lambda line, e: e["p"].update(World=1.5)), "not in [0, 1]"),
        (broken(lambda line, e: e["p"].update(World="high")), "'World' is str"),
        (broken(lambda line, e: e.update(p={})), "'p' is empty"),
        (broken(lambda line, e: e.update(tokens=-1)), "'tokens' is negative"),
        (broken(lambda line, e: e.update(cut=0)), "'cut' is int"),
        (broken(lambda line, e: e.update(text_sha256="A" * 43 + "=")), "'text_sha256' is not a sha256 digest"),
        (broken(lambda line, e: e.update(text_sha256="A" * 42 + "B")), "'text_sha256' is not a sha256 digest"),
        (broken(lambda line, e: e.update(text="not x")), "is not the sha256 of 'text'"),
        (broken(lambda line, e: e.pop("p")), "lacks 'p'"),
    ],
)
def test_a_line_that_breaks_the_schema_is_refused_naming_the_field(line: str, message: str) -> None:
    with pytest.raises(ContractError) as caught:
        parse_line(line)
    assert message in str(caught.value)


# The handler: one line per request, records that match the answers, and capturing never changes an answer.
def test_one_text_makes_one_line_within_its_byte_budget(serve, mirror_root: Path, capsys) -> None:
    invoke = serve(mirror_root)
    one_request(invoke, capsys, {"text": SEED_TEXT})  # the first request loads the model
    response = invoke({"text": SEED_TEXT}, SimpleNamespace(aws_request_id=str(uuid.uuid4())))
    (printed,) = capsys.readouterr().out.splitlines()  # one line, and nothing else
    assert len(printed.encode("utf-8")) <= ONE_TEXT_LINE_BYTES
    (record,) = parse_line(printed)
    assert record.predicted_class == response["body"]["predicted_class"]
    assert record.confidence == pytest.approx(response["body"]["confidence"], abs=1e-4)
    assert record.text is None and SEED_TEXT not in printed


def test_records_match_the_answers_and_never_change_them(serve, mirror_root: Path, capsys, monkeypatch) -> None:
    answers = {}
    for rate, keep in (("0", "false"), ("1", "false"), ("1", "true")):
        invoke = serve(mirror_root, CAPTURE_RATE=rate, CAPTURE_TEXT=keep)
        response, line = one_request(invoke, capsys, {"texts": TEXTS})
        answers[rate, keep] = response["body"]
        records = parse_line(json.dumps(line))
        if rate == "0":
            assert CAPTURES not in line
            continue
        assert len(records) == len(TEXTS)
        manifest = hashlib.sha256((stored_folder(mirror_root, 1) / "manifest.json").read_bytes()).hexdigest()
        for text, answer, record in zip(TEXTS, response["body"], records, strict=True):
            assert record.predicted_class == answer["predicted_class"]
            assert record.probabilities == pytest.approx(answer["probabilities"], abs=1e-4)
            assert record.text_sha256 == hashlib.sha256(text.encode()).hexdigest()
            assert record.text == (text if keep == "true" else None)
            assert (record.model_name, record.model_version, record.manifest_sha256) == (MODEL_NAME, 1, manifest)
            assert 0 < record.tokens <= 128 and not record.cut
    assert answers[("0", "false")] == answers[("1", "false")] == answers[("1", "true")]


def test_a_text_longer_than_the_model_reads_is_captured_as_cut(serve, mirror_root: Path, capsys) -> None:
    long_text = " ".join([SEED_TEXT] * 40)  # far more than 128 tokens
    _, line = one_request(serve(mirror_root), capsys, {"texts": [long_text, SEED_TEXT]})
    long, short = parse_line(json.dumps(line))
    assert (long.cut, short.cut) == (True, False)
    assert long.tokens == 126  # the tiny bundle's max_length less [CLS] and [SEP]
    assert short.tokens < long.tokens


def test_a_sampled_rate_keeps_the_texts_that_its_draws_pick(serve, mirror_root: Path, capsys) -> None:
    texts = [f"{SEED_TEXT} ({i})" for i in range(64)]
    invoke = serve(mirror_root, CAPTURE_RATE="0.25")
    one_request(invoke, capsys, {"text": SEED_TEXT})  # the model loads (the warm-up draws nothing)
    random.seed(7)
    _, line = one_request(invoke, capsys, {"texts": texts})
    random.seed(7)
    picked = [text for text in texts if random.random() < 0.25]
    captured = [record.text_sha256 for record in parse_line(json.dumps(line))]
    assert captured == [hashlib.sha256(text.encode()).hexdigest() for text in picked]
    assert 0 < len(captured) < len(texts)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("CAPTURE_RATE", "1.5", "CAPTURE_RATE='1.5' must be between 0 and 1"),
        ("CAPTURE_RATE", "-0.1", "CAPTURE_RATE='-0.1' must be at least 0"),
        ("CAPTURE_RATE", "nan", "CAPTURE_RATE='nan' must be between 0 and 1"),
        ("CAPTURE_TEXT", "yes", "CAPTURE_TEXT='yes' must be true or false"),
    ],
)
def test_bad_capture_settings_give_500_naming_the_variable(lambda_module, name: str, value: str, message) -> None:
    with pytest.raises(lambda_module.SettingsError, match=re.escape(message)):
        lambda_module.Settings.from_env({name: value})


def test_a_capture_sink_that_fails_leaves_the_answer_and_logs_one_line(serve, mirror_root: Path, capsys) -> None:
    invoke = serve(mirror_root)
    expected, _ = one_request(invoke, capsys, {"texts": TEXTS})

    def full_disk(model_name: str, line: str) -> None:
        raise OSError(28, "No space left on device")

    invoke.service.capture_sink = full_disk
    capsys.readouterr()
    response = invoke({"texts": TEXTS}, None)
    assert response == expected
    request, error = capsys.readouterr().out.splitlines()
    assert len(parse_line(request)) == len(TEXTS)  # the line itself still goes to stdout
    assert json.loads(error) | {"request_id": None} == {
        "level": "ERROR",
        "message": "capture not written: OSError: [Errno 28] No space left on device",
        "request_id": None,
    }


# lambda/local.py: the same lines, in the same layout, in the store it serves from.
def stored_records(root: Path) -> tuple[list[Path], list]:
    objects = sorted(path for path in (root / CAPTURES / MODEL_NAME).rglob("*") if path.is_file())
    return objects, [record for path in objects for record in parse_lines(path.read_bytes(), str(path))]


def ask(server: LocalServer, payload: dict) -> dict | list:
    status, body = server.request(data=json.dumps(payload).encode())
    assert status == 200, body
    return body


@pytest.mark.parametrize("keep_text", ["false", "true"])
def test_local_server_writes_a_capture_line_per_request_into_its_store(
    mirror_root: Path, tmp_path: Path, keep_text: str
) -> None:
    store = mirror_root.parent.parent  # <root>/models/<name>: the captures go to <root>/captures/<name>/
    server = LocalServer(lambda_process(mirror_root, tmp_path) | {"CAPTURE_TEXT": keep_text})
    try:
        answers = [ask(server, {"text": ONE_MORE}), *ask(server, {"texts": TEXTS})]
        assert server.request("POST", b"{oops")[0] == 400
        assert server.request("GET")[0] == 200
    finally:
        printed = server.stop()
    objects, records = stored_records(store)
    assert len(objects) == 2  # the two requests that answered texts, one object each
    hour = object_prefix(MODEL_NAME, records[0].time)
    assert all(path.relative_to(store).as_posix().startswith(hour) for path in objects)
    assert all(re.fullmatch(r"agnews-local-1-[\d-]{19}-[0-9a-f-]{36}", path.name) for path in objects)
    texts = [ONE_MORE, *TEXTS]
    by_text = {record.text_sha256: record for record in records}
    assert len(by_text) == len(records) == len(texts)
    for text, answer in zip(texts, answers, strict=True):
        record = by_text[hashlib.sha256(text.encode()).hexdigest()]
        assert record.predicted_class == answer["predicted_class"]
        assert record.text == (text if keep_text == "true" else None)
    # the stored lines are the lines on stdout, with their request ids
    stored = sorted(line for path in objects for line in path.read_text().splitlines())
    assert stored == sorted(line.rstrip("\n") for line in printed if f'"{CAPTURES}"' in line)
    assert len({record.request_id for record in records}) == 2
    if keep_text == "false":
        assert not any(text in path.read_text() for path in objects for text in texts)


def test_local_server_with_a_capture_rate_of_0_writes_nothing(mirror_root: Path, tmp_path: Path) -> None:
    server = LocalServer(lambda_process(mirror_root, tmp_path) | {"CAPTURE_RATE": "0"})
    try:
        ask(server, {"texts": TEXTS})
    finally:
        server.stop()
    assert not (mirror_root.parent.parent / CAPTURES).exists()


def test_local_server_answers_when_its_captures_cannot_be_written(mirror_root: Path, tmp_path: Path) -> None:
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the captures' folder would go")
    server = LocalServer(lambda_process(mirror_root, tmp_path), "--captures", str(blocked))
    try:
        answers = [ask(server, {"text": text}) for text in TEXTS]
    finally:
        printed = server.stop()
    reference = LocalServer(lambda_process(mirror_root, tmp_path / "reference"))
    try:
        assert [ask(reference, {"text": text}) for text in TEXTS] == answers
    finally:
        reference.stop()
    errors = [json.loads(line) for line in printed if '"capture not written' in line]
    assert len(errors) == len(TEXTS)  # one line per request that could not be written
    assert all(error["level"] == "ERROR" and "Not a directory" in error["message"] for error in errors)


def test_local_server_writes_captures_to_an_s3_store(
    mirror_root: Path, tmp_path: Path, s3_env: str, bucket: str
) -> None:
    upload_tree(mirror_root, s3_env, bucket, f"models/{MODEL_NAME}")
    env = lambda_process(mirror_root, tmp_path) | {"MODEL_URI": f"s3://{bucket}/models/{MODEL_NAME}"}
    server = LocalServer(env)
    try:
        answer = ask(server, {"text": SEED_TEXT})
    finally:
        server.stop()
    s3 = boto3.client("s3", endpoint_url=s3_env)
    (key,) = [item["Key"] for item in s3.list_objects_v2(Bucket=bucket, Prefix=f"{CAPTURES}/")["Contents"]]
    (record,) = parse_lines(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    assert key.startswith(object_prefix(MODEL_NAME, record.time))
    assert record.predicted_class == answer["predicted_class"]


def test_local_server_on_a_port_in_use_says_so_in_one_line(tmp_path: Path) -> None:
    port = free_port()
    with socket.create_server(("127.0.0.1", port)):
        done = subprocess.run(
            [sys.executable, str(LAMBDA_DIR / "local.py"), "--port", str(port)],
            env=lambda_process(tmp_path / "none", tmp_path),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 1
    assert done.stderr == f"error: cannot listen on 127.0.0.1:{port}: Address already in use\n"
    assert done.stdout == ""


# The template's way to storage, on the moto server: log group -> subscription filter -> Firehose -> S3.
def substituted(value: object, names: dict[str, str]) -> str:
    """A template string (``!Sub`` or plain) with ``names`` put in."""
    text = value["Fn::Sub"] if isinstance(value, dict) else value
    for name, replacement in names.items():
        text = text.replace(f"${{{name}}}", replacement)
    return text


def test_the_template_sends_capture_lines_to_the_model_bucket_only_when_asked() -> None:
    resources = template_resources()
    capture = [name for name, resource in resources.items() if resource.get("Condition") == "Captures"]
    assert sorted(capture) == ["CaptureDeliveryRole", "CaptureStream", "CaptureSubscription", "CaptureSubscriptionRole"]
    (policy,) = resources["CaptureDeliveryRole"]["Properties"]["Policies"]
    (statement,) = policy["PolicyDocument"]["Statement"]
    assert statement["Action"] == ["s3:PutObject", "s3:AbortMultipartUpload"]
    assert statement["Resource"] == {"Fn::Sub": "arn:${AWS::Partition}:s3:::${ModelBucket}/captures/${ModelName}/*"}
    destination = resources["CaptureStream"]["Properties"]["ExtendedS3DestinationConfiguration"]
    assert destination["Prefix"] == {"Fn::Sub": "captures/${ModelName}/"}
    assert substituted(destination["ErrorOutputPrefix"], {}).startswith("captures/${ModelName}/failed/")
    processors = destination["ProcessingConfiguration"]["Processors"]
    assert [p["Type"] for p in processors] == ["Decompression", "CloudWatchLogProcessing", "AppendDelimiterToRecord"]
    assert processors[1]["Parameters"] == [{"ParameterName": "DataMessageExtraction", "ParameterValue": "true"}]
    function = resources["ClassifierFunction"]["Properties"]
    assert function["LoggingConfig"]["LogGroup"] == {"Ref": "ClassifierLogGroup"}
    # JSON is what lets Lambda leave out its START, END and REPORT lines; the function's own lines stay as printed
    assert function["LoggingConfig"]["LogFormat"] == "JSON"
    assert function["LoggingConfig"]["SystemLogLevel"] == {"Ref": "PlatformLogLevel"}
    assert function["Environment"]["Variables"]["CAPTURE_RATE"] == {"Ref": "CaptureRate"}
    assert resources["CaptureSubscription"]["Properties"]["LogGroupName"] == {"Ref": "ClassifierLogGroup"}


@pytest.mark.integration
def test_logs_go_through_the_subscription_filter_and_firehose_into_the_capture_prefix(
    serve, mirror_root: Path, capsys, s3_env: str, bucket: str
) -> None:
    """The template's stream and filter, made on the moto server with its own values, and a real request's line put
    into the log group. moto delivers the gzipped CloudWatch Logs batch under the stream's prefix (it applies
    neither the filter pattern nor Firehose's processors); the decompression and message extraction that the
    template's processors do are done here, on what moto delivered."""
    _, line = one_request(serve(mirror_root), capsys, {"texts": TEXTS})
    resources = template_resources()
    names = {"ModelName": MODEL_NAME, "ModelBucket": bucket, "AWS::Partition": "aws"}
    destination = resources["CaptureStream"]["Properties"]["ExtendedS3DestinationConfiguration"]
    firehose = boto3.client("firehose", endpoint_url=s3_env)
    role = "arn:aws:iam::123456789012:role/capture"
    stream = firehose.create_delivery_stream(
        DeliveryStreamName="captures",
        DeliveryStreamType="DirectPut",
        ExtendedS3DestinationConfiguration={
            "BucketARN": substituted(destination["BucketARN"], names),
            "RoleARN": role,
            "Prefix": substituted(destination["Prefix"], names),
            "ErrorOutputPrefix": substituted(destination["ErrorOutputPrefix"], names),
            "CompressionFormat": destination["CompressionFormat"],
            "ProcessingConfiguration": destination["ProcessingConfiguration"],
        },
    )
    logs = boto3.client("logs", endpoint_url=s3_env)
    group = f"/aws/lambda/{bucket}-classifier"
    logs.create_log_group(logGroupName=group)
    logs.create_log_stream(logGroupName=group, logStreamName="instance")
    subscription = resources["CaptureSubscription"]["Properties"]
    logs.put_subscription_filter(
        logGroupName=group,
        filterName="captures",
        filterPattern=subscription["FilterPattern"],
        destinationArn=stream["DeliveryStreamARN"],
        roleArn=role,
    )
    logs.put_log_events(
        logGroupName=group,
        logStreamName="instance",
        logEvents=[{"timestamp": line["time"], "message": json.dumps(line)}],
    )
    s3 = boto3.client("s3", endpoint_url=s3_env)
    (key,) = [item["Key"] for item in s3.list_objects_v2(Bucket=bucket, Prefix=f"{CAPTURES}/")["Contents"]]
    assert key.startswith(f"{CAPTURES}/{MODEL_NAME}/")
    assert re.fullmatch(rf"{CAPTURES}/{MODEL_NAME}/\d{{4}}/\d\d/\d\d/\d\d/captures-1-[\d-]{{19}}-[0-9a-f-]{{36}}", key)
    batch = json.loads(gzip.decompress(s3.get_object(Bucket=bucket, Key=key)["Body"].read()))
    delivered = "".join(event["message"] + "\n" for event in batch["logEvents"])  # what the processors make of it
    records = parse_lines(delivered)
    assert [record.text_sha256 for record in records] == [hashlib.sha256(t.encode()).hexdigest() for t in TEXTS]
