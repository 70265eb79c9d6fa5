"""A local HTTP front for the handler: each request becomes an HTTP API (v2) event, as a Function URL sends it.

MODEL_URI=.store/models/distilbert-agnews python lambda/local.py --port 8080
curl -s localhost:8080 -d '{"text": "Apple reported strong quarterly earnings"}'

It runs on waitress (a dev dependency, pinned in requirements-dev.txt), a production WSGI server, so that it holds
up under a load test: a listen backlog of 1,024 connections, ``--threads`` requests answered at once (the rest wait
in its queue, not in the kernel's), and a body larger than ``--max-body`` bytes (Lambda's 6 MiB request limit)
refused with a 413 before it is read. Each request gets a context with a fresh request id, as in Lambda, which the
JSON logs carry.
"""

from __future__ import annotations

import argparse
import base64
import json
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

from handler import lambda_handler
from waitress.server import MultiSocketServer, create_server

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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve the Lambda handler over HTTP on this machine.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--threads", type=int, default=4, help="requests answered at once (default 4)")
    parser.add_argument("--max-body", type=int, default=MAX_BODY, help=f"largest body in bytes (default {MAX_BODY})")
    args = parser.parse_args(argv)
    server = create_server(
        app, host=args.host, port=args.port, threads=args.threads, max_request_body_size=args.max_body, ident="agnews"
    )
    # A host with several addresses (localhost: ::1 and 127.0.0.1) gets a MultiSocketServer, one socket each.
    # ignored: types-waitress leaves out the single server's effective_port, which waitress sets.
    port = (
        server.effective_listen[0][1] if isinstance(server, MultiSocketServer) else server.effective_port  # type: ignore[attr-defined]
    )
    print(json.dumps({"listening": f"http://{args.host}:{port}"}), flush=True)
    server.run()


if __name__ == "__main__":
    main()
