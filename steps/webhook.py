"""The `webhook` entry point: serve the receiver that mirrors @champion when it moves in the MLflow UI, or register it.

    python -m steps.webhook serve [--host 127.0.0.1] [--port 8088] [overrides ...]
    python -m steps.webhook register --url http://<receiver>:8088/ [overrides ...]

Both take the webhook's secret from AGNEWS_WEBHOOK_SECRET and the usual Hydra overrides (tracking, storage,
registry.model_name). ``serve`` runs until stopped; ``register`` creates or updates the tracking server's webhook.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from mlflow import MlflowClient
from omegaconf import DictConfig

from agnews.config import compose, redact, split_overrides
from agnews.errors import PipelineError
from agnews.tracking import connect
from agnews.webhooks import SECRET_ENV, Receiver, make_receiver_server, register_webhook

log = logging.getLogger("steps.webhook")


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m steps.webhook", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["serve", "register"])
    parser.add_argument("--host", default="127.0.0.1", help="serve: the address to listen on (0.0.0.0: all)")
    parser.add_argument("--port", type=int, default=8088, help="serve: the port to listen on")
    parser.add_argument("--url", default="", help="register: the URL at which the tracking server reaches `serve`")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for the other steps")
    args = parser.parse_intermixed_args(argv)  # overrides may follow the options
    args.overrides = split_overrides(args.overrides)
    return args


def serve(cfg: DictConfig, secret: str, host: str, port: int) -> None:
    receiver = Receiver(cfg, secret)
    server = make_receiver_server(receiver, host, port)
    log.info("webhook receiver for %s on http://%s:%s/", cfg.registry.model_name, host, server.server_port)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        receiver.close()


def main(argv: list[str] | None = None) -> None:
    args = parse(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="[%(asctime)s][%(name)s] %(message)s")
    for name in ("agnews", "steps"):
        logging.getLogger(name).setLevel(logging.INFO)
    secret = os.environ.get(SECRET_ENV, "")
    try:
        cfg = compose(args.overrides)
        connect(cfg)
        if args.command == "serve":
            serve(cfg, secret, args.host, args.port)
        else:
            hook = register_webhook(MlflowClient(), args.url, secret)
            events = ", ".join(str(event) for event in hook.events)
            where = redact(cfg.tracking.uri)
            print(f"webhook {hook.name} ({hook.webhook_id}) at {where} delivers {events} to {hook.url}")
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
