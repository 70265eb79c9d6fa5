"""A local HTTP front for the handler: each request becomes an HTTP API (v2) event, as a Function URL sends it.

MODEL_URI=.store/models/distilbert-agnews python lambda/local.py --port 8080
curl -s localhost:8080 -d '{"text": "Apple reported strong quarterly earnings"}'

It runs on waitress (a dev dependency, pinned in requirements-dev.txt), a production WSGI server, so that it holds
up under a load test: a listen backlog of 1,024 connections, ``--threads`` requests answered at once (the rest wait
in its queue, not in the kernel's), and a body larger than ``--max-body`` bytes (Lambda's 6 MiB request limit)
refused with a 413 before it is read. Each request gets a context with a fresh request id, as in Lambda, which the
JSON logs carry.

Each request's line goes to stdout as in Lambda, and a line with capture records is also written into the store the
model is served from, where the template's Firehose stream puts them in AWS: ``captures/<model>/YYYY/MM/DD/HH/`` (UTC)
below the store's root, one object of JSON lines per request (``CaptureStore``). The root is the model's root less
its last two parts (``<storage.model_prefix>/<registry.model_name>``); ``--captures`` names another (a folder or
``s3://bucket/prefix``). A capture that cannot be written leaves the answer as it is and logs one line.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import posixpath
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import handler
from handler import lambda_handler
from settings import Settings, SettingsError, canonical_uri
from waitress.server import MultiSocketServer, create_server

from bundle.capture import object_prefix

MAX_BODY = 6 * 1024 * 1024  # Lambda's limit on a synchronous request's payload
REASONS = {200: "OK", 400: "Bad Request", 405: "Method Not Allowed", 500: "Internal Server Error"}
REASONS |= {503: "Service Unavailable"}


@dataclass(frozen=True)
class LocalContext:
    """The attributes of a Lambda context object that the handler and Powertools read."""

    aws_request_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    function_name: str = "agnews-local"
    function_version: str = "$LATEST"
    memory_limit_in_mb: int = 0
    invoked_function_arn: str = "arn:aws:lambda:local:000000000000:function:agnews-local"


def to_event(method: str, target: str, headers: dict[str, str], body: bytes, client_ip: str) -> dict[str, Any]:
    """The HTTP API (v2) event for one request; the body goes base64-encoded, as for a Function URL."""
    path, _, query = target.partition("?")
    return {
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": path,
        "rawQueryString": query,
        "headers": {name.lower(): value for name, value in headers.items()},
        "requestContext": {
            "http": {"method": method, "path": path, "protocol": "HTTP/1.1", "sourceIp": client_ip},
            "routeKey": "$default",
            "stage": "$default",
            "timeEpoch": int(time.time() * 1000),
        },
        "body": base64.b64encode(body).decode("ascii"),
        "isBase64Encoded": True,
    }


def _headers(environ: dict[str, Any]) -> dict[str, str]:
    headers = {key[5:].replace("_", "-").lower(): value for key, value in environ.items() if key.startswith("HTTP_")}
    for key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
        if environ.get(key):
            headers[key.replace("_", "-").lower()] = environ[key]
    return headers


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """The WSGI application: every request, whatever its method, goes to the Lambda handler."""
    body = environ["wsgi.input"].read()  # waitress has checked its size against max_request_body_size
    query = environ.get("QUERY_STRING")
    target = quote(environ.get("PATH_INFO") or "/") + (f"?{query}" if query else "")
    event = to_event(environ["REQUEST_METHOD"], target, _headers(environ), body, environ.get("REMOTE_ADDR", ""))
    response = lambda_handler(event, LocalContext())
    payload = response["body"].encode("utf-8")
    status = response["statusCode"]
    headers = [*response["headers"].items(), ("Content-Length", str(len(payload)))]
    start_response(f"{status} {REASONS.get(status, 'Unknown')}", headers)
    return [payload]


class CaptureStore:
    """Capture lines written where Firehose delivers them: ``<root>/captures/<model>/YYYY/MM/DD/HH/<object>``, the
    object named as Firehose names its own (``<stream>-<version>-<YYYY-MM-DD-HH-MM-SS>-<uuid>``), one per request.
    ``root``: a folder, or ``s3://bucket[/prefix]`` (S3_ENDPOINT_URL and AWS_REGION as the handler reads them)."""

    STREAM = "agnews-local-1"

    def __init__(self, root: str) -> None:
        self.root = root
        self.client: Any = None
        if root.startswith("s3://"):
            import boto3  # only an S3 store pays for it

            region, endpoint = os.environ.get("AWS_REGION") or None, os.environ.get("S3_ENDPOINT_URL") or None
            self.client = boto3.client("s3", region_name=region, endpoint_url=endpoint)

    def key(self, model_name: str, when: datetime) -> str:
        return f"{object_prefix(model_name, when)}{self.STREAM}-{when:%Y-%m-%d-%H-%M-%S}-{uuid.uuid4()}"

    def __call__(self, model_name: str, line: str) -> None:
        key = self.key(model_name, datetime.now(UTC))
        data = (line + "\n").encode("utf-8")
        if self.client is not None:
            bucket, _, prefix = self.root.removeprefix("s3://").partition("/")
            self.client.put_object(Bucket=bucket, Key=posixpath.join(prefix, key), Body=data)
            return
        path = Path(self.root) / key
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.part")
        partial.write_bytes(data)
        partial.replace(path)  # a reader never sees half an object


def store_root(model_uri: str | None) -> str | None:
    """The root of the store that serves ``model_uri`` (``<root>/<model_prefix>/<model_name>``); None without one."""
    if not model_uri:
        return None
    uri = canonical_uri(model_uri)
    if uri.startswith("s3://"):
        bucket, _, prefix = uri.removeprefix("s3://").partition("/")
        return f"s3://{bucket}/{posixpath.dirname(posixpath.dirname(prefix))}".rstrip("/")
    return str(Path(uri).parent.parent)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve the Lambda handler over HTTP on this machine.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--threads", type=int, default=4, help="requests answered at once (default 4)")
    parser.add_argument("--max-body", type=int, default=MAX_BODY, help=f"largest body in bytes (default {MAX_BODY})")
    parser.add_argument(
        "--captures",
        help="the store root that captures/ goes below (default: the model's root less its last two parts)",
    )
    args = parser.parse_args(argv)
    try:
        server = create_server(
            app,
            host=args.host,
            port=args.port,
            threads=args.threads,
            max_request_body_size=args.max_body,
            ident="agnews",
        )
    except (OSError, OverflowError) as exc:  # OverflowError: a port outside 0-65535
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        print(f"error: cannot listen on {args.host}:{args.port}: {why}", file=sys.stderr)
        sys.exit(1)
    try:
        root = args.captures or store_root(Settings.from_env().model_uri)
    except SettingsError:  # every request answers 500 with the reason
        root = None
    if root is not None:
        handler.service.capture_sink = CaptureStore(root)
    # A host with several addresses (localhost: ::1 and 127.0.0.1) gets a MultiSocketServer, one socket each.
    # ignored: types-waitress leaves out the single server's effective_port, which waitress sets.
    port = (
        server.effective_listen[0][1] if isinstance(server, MultiSocketServer) else server.effective_port  # type: ignore[attr-defined]
    )
    print(json.dumps({"listening": f"http://{args.host}:{port}"}), flush=True)
    server.run()


if __name__ == "__main__":
    main()
