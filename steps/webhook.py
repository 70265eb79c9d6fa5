"""The `webhook` entry point: serve the receiver that keeps storage on @champion, or (un)register its webhook.

    python -m steps.webhook serve [--host 127.0.0.1] [--port 8088] [overrides ...]
    python -m steps.webhook register --url http://<receiver>:8088/ [overrides ...]
    python -m steps.webhook unregister [--backend-store-uri <the server's database>] [overrides ...]

All take the webhook's secret from AGNEWS_WEBHOOK_SECRET (unregister needs none) and the usual Hydra overrides
(tracking, storage, registry.model_name, webhook.*). ``serve`` listens and prints its address before it loads
anything else, then reconciles every ``webhook.reconcile_s`` seconds until stopped; ``register`` creates or updates
the tracking server's webhook and has the server deliver test events to it; ``unregister`` removes it, through the
server or, with ``--backend-store-uri``, through its database when no worker can decrypt the secret any more.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import socket
import sys

log = logging.getLogger("steps.webhook")


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m steps.webhook", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["serve", "register", "unregister"])
    parser.add_argument("--host", default="127.0.0.1", help="serve: the address to listen on (0.0.0.0: all)")
    parser.add_argument("--port", type=int, default=8088, help="serve: the port to listen on")
    parser.add_argument("--url", default="", help="register: the URL at which the tracking server reaches `serve`")
    parser.add_argument(
        "--backend-store-uri",
        default="",
        help="unregister: through the tracking server's database (its --backend-store-uri), for a server that can "
        "no longer decrypt the webhook's secret",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for the other steps")
    args = parser.parse_intermixed_args(argv)  # overrides may follow the options
    if args.backend_store_uri and args.command != "unregister":
        parser.error("--backend-store-uri is for unregister only")
    return args


def run(args: argparse.Namespace, sock: socket.socket | None) -> None:
    """The command, once MLflow, Hydra and the project are loaded (seconds)."""
    from agnews.config import compose, redact, split_overrides
    from agnews.names import WEBHOOK_SECRET_ENV
    from agnews.promotion.receiver import Receiver, make_receiver_server
    from agnews.promotion.webhook_admin import (
        http_settings,
        register_webhook,
        server_uri,
        unregister_in_database,
        unregister_webhook,
    )
    from agnews.tracking import connect

    secret = os.environ.get(WEBHOOK_SECRET_ENV, "")
    if args.backend_store_uri:
        removed = unregister_in_database(args.backend_store_uri)
        where = redact(args.backend_store_uri)
        print(f"removed {len(removed)} webhook(s) from {where}: {', '.join(removed) or 'none was registered'}")
        return
    cfg = compose(split_overrides(args.overrides))
    if sock is None:
        server_uri(cfg.tracking)  # register and unregister need a tracking server: say so before connecting
    os.environ.update(http_settings(cfg.webhook))
    connect(cfg.tracking)
    where = redact(cfg.tracking.uri)
    if sock is not None:
        receiver = Receiver(cfg.registry, cfg.storage, cfg.webhook, secret)
        server = make_receiver_server(receiver, sock, cfg.webhook)
        log.info("reconciling %s every %gs with %s", cfg.registry.model_name, receiver.reconcile_s, where)
        try:
            server.run()
        finally:
            server.close()
            receiver.close()
    elif args.command == "register":
        hook = register_webhook(cfg.tracking, cfg.webhook, args.url, secret)
        events = ", ".join(str(event) for event in hook.events)
        print(f"webhook {hook.name} ({hook.webhook_id}) at {where} delivers {events} to {hook.url}")
    else:
        removed = unregister_webhook(cfg.tracking, cfg.webhook)
        print(f"removed {len(removed)} webhook(s) from {where}: {', '.join(removed) or 'none was registered'}")


def main(argv: list[str] | None = None) -> None:
    args = parse(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="[%(asctime)s][%(name)s] %(message)s")
    for name in ("agnews", "steps"):
        logging.getLogger(name).setLevel(logging.INFO)
    sock = None
    if args.command == "serve":
        try:
            sock = socket.create_server((args.host, args.port), backlog=1024)
        except (OSError, OverflowError) as exc:  # OverflowError: a port outside 0-65535
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            print(f"error: cannot listen on {args.host}:{args.port}: {why}", file=sys.stderr)
            sys.exit(1)
        host, port = sock.getsockname()[:2]
        # at once: loading MLflow and the project takes seconds; requests wait in the backlog meanwhile
        print(f"webhook receiver listening on http://{host}:{port}/ (starting)", flush=True)
    from agnews.config import command  # the shared wrapper: a PipelineError is one line, exit status 1

    with contextlib.suppress(KeyboardInterrupt):
        command(run)(args, sock)


if __name__ == "__main__":
    main()
