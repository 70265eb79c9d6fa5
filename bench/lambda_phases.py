"""Where a warm request's time goes inside the Lambda handler, phase by phase, for bench/lambda_latency.py.

It runs in the process of the unpacked Lambda zip (the runtime's Python, the zip's numpy and onnxruntime), so it
imports the standard library and the handler only. Each phase is the handler's own function, run on the same
request as the handler runs it: event parsing (the Function URL event to checked texts), the cut, tokenization
(padded batches of ``batch_size`` texts), the onnxruntime run, softmax (and the result dicts), the capture records
and the request's one line (log fields, metric fields and records, as JSON). The whole request is timed in the same
rounds; what the phases leave of it is the handler's glue.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import time
from collections import Counter
from collections.abc import Iterator
from types import ModuleType
from typing import Any

REQUEST_ID = "c6af9ac6-7b61-11e6-9a41-93e8deadbeef"  # a Lambda request id's length, for the line
PHASES = ("event_parsing", "cut", "tokenization", "onnxruntime", "softmax", "capture", "line")


def function_url_event(payload: dict[str, Any]) -> dict[str, Any]:
    """An HTTP API (v2) POST, as a Function URL sends it, with ``payload`` as its JSON body."""
    return {
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": "/",
        "headers": {"content-type": "application/json"},
        "requestContext": {"http": {"method": "POST", "path": "/", "sourceIp": "127.0.0.1"}},
        "body": json.dumps(payload, ensure_ascii=False),
        "isBase64Encoded": False,
    }


def phases(handler: ModuleType, texts: list[str], runs: int) -> dict[str, Any]:
    """Median milliseconds of each phase of a request of ``texts`` (one ``text`` when there is one), over ``runs``
    rounds after one warm-up, with the whole request's median and the share of it spent outside the onnxruntime
    run."""
    from bundle.predictor import Reading  # the zip's, on the handler's path

    event = function_url_event({"text": texts[0]} if len(texts) == 1 else {"texts": texts})
    store = handler.model_store()
    model = store.get()
    predictor = model.predictor
    handler.lambda_handler(event, None)  # the warm-up: the model is loaded, and every phase has run once
    times: dict[str, list[float]] = {name: [] for name in (*PHASES, "request")}

    @contextlib.contextmanager
    def timed(name: str) -> Iterator[None]:
        began = time.perf_counter()
        yield
        times[name].append(1000 * (time.perf_counter() - began))

    for _ in range(runs):
        with timed("event_parsing"):
            parsed, _ = handler.parse_texts(event, handler.http_event(event), store.settings)
        with timed("cut"):
            cut = [predictor.cut(text) for text in parsed]
        with timed("tokenization"):
            batches = predictor.batches(cut)
        with timed("onnxruntime"):
            logits = predictor.run(batches)
        with timed("softmax"):
            results = predictor.results(logits)
        outcome = handler.Outcome(
            model=model, texts=len(texts), predicted=Counter(r["predicted_class"] for r in results)
        )
        with timed("capture"):
            readings = [Reading(len(text), False) for text in cut]  # values that cost what real ones do
            handler.Service._capture(parsed, results, readings, store.settings, outcome)
        with timed("line"):
            handler.request_lines(200, 1.0, outcome, REQUEST_ID, 0)
        with timed("request"):
            handler.lambda_handler(event, None)
    p50 = {name: statistics.median(values) for name, values in times.items()}
    return {
        "texts": len(texts),
        "runs": runs,
        "p50_ms": p50,
        "rest_ms": p50["request"] - sum(p50[name] for name in PHASES),
        "outside_the_model_share": 1 - p50["onnxruntime"] / p50["request"],
    }
