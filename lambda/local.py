"""A local HTTP front for the handler: each request becomes an HTTP API (v2) event, as a Function URL sends it.

MODEL_URI=.store/models/distilbert-agnews python lambda/local.py --port 8080
curl -s localhost:8080 -d '{"text": "Apple reported strong quarterly earnings"}'
"""

from __future__ import annotations

import argparse
import base64
import json
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from handler import lambda_handler


def to_event(method: str, target: str, headers: dict[str, str], body: bytes, client_ip: str) -> dict[str, Any]:
    """The HTTP API (v2) event for one request; the body goes base64-encoded, as for a Function URL."""
    url = urlsplit(target)
    return {
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": url.path,
        "rawQueryString": url.query,
        "headers": {name.lower(): value for name, value in headers.items()},
        "requestContext": {
            "http": {"method": method, "path": url.path, "protocol": "HTTP/1.1", "sourceIp": client_ip},
            "routeKey": "$default",
            "stage": "$default",
            "timeEpoch": int(time.time() * 1000),
        },
        "body": base64.b64encode(body).decode("ascii"),
        "isBase64Encoded": True,
    }


class Handler(BaseHTTPRequestHandler):
    """Hands every request, whatever its method, to the Lambda handler."""

    def _invoke(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        event = to_event(self.command, self.path, dict(self.headers.items()), body, self.client_address[0])
        response = lambda_handler(event, None)
        payload = response["body"].encode("utf-8")
        self.send_response(response["statusCode"])
        for name, value in response["headers"].items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_OPTIONS = _invoke


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve the Lambda handler over HTTP on this machine.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args(argv)
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    print(json.dumps({"listening": f"http://{args.host}:{server.server_port}"}), flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
