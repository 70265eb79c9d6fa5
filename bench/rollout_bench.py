"""What a rollout costs the Lambda, in one run on one pinned CPU: the warm one-text p50 and the peak RSS of the
handler serving the champion alone, with a 10% canary, and with a shadow, over the same 200-text pool.

    python bench/rollout_bench.py --model-root <store>/models/<name> [--runs 400] [--output bench/results/rollout.json]

``--model-root`` is a mirrored model (the folder that holds ``champion.json``, e.g. what ``make smoke`` mirrored).
Its champion's bundle is laid out again as a second version (the same files, its own manifest), so the candidate is
a model of the same size and cost, as a retrained one would be. Each case runs the handler (``lambda/handler.py``,
its ``Service`` over the real ``ModelStore``) in a process of its own started on one CPU (``--cpu``, by default the
last this process may use), as Lambda runs a function below 1,769 MB: warm-up, then one-text requests round the
pool; the peak RSS is the process's VmHWM, which holds one bundle's session or two. The machine and the load
average before and after go beside the figures (bench/machine.py): figures count only from a run alone.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from machine import machine

from agnews.data import parse_csv
from agnews.promotion.mirror import point_to, put_verified
from agnews.storage import LocalStorage
from bundle.layout import MANIFEST, POINTER, candidate_for, manifest_bytes, parse_manifest, parse_pointer, sha256
from bundle.layout import version_folder as folder_of

ROOT = Path(__file__).resolve().parent.parent
AGNEWS_DIR = ROOT.parent / "shared" / "data" / "ag_news"
POOL = 200
MODES = {"champion": None, "canary": ("canary", 0.1), "shadow": ("shadow", 0.0)}

# One case, in a process of its own: the handler's store over the model root, warm-up, then one-text requests.
WORKER = """
import json, statistics, sys, time, uuid
sys.path[:0] = sys.argv[1:3]
import handler
pool, runs = json.load(sys.stdin)

class Context:
    def __init__(self):
        self.aws_request_id = str(uuid.uuid4())

def status_kb(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))

import contextlib, io
with contextlib.redirect_stdout(io.StringIO()):
    for text in pool[:20]:  # loads the champion (and the candidate)
        assert handler.lambda_handler({"text": text}, Context())["statusCode"] == 200
    times, answered = [], {}
    for i in range(runs):
        began = time.perf_counter()
        response = handler.lambda_handler({"text": pool[i % len(pool)]}, Context())
        times.append((time.perf_counter() - began) * 1000)
        version = response["body"]["model_version"]
        answered[version] = answered.get(version, 0) + 1
rollout = handler.model_store().rollout()
print(json.dumps({
    "p50_ms": statistics.median(times),
    "p95_ms": statistics.quantiles(times, n=20)[-1],
    "rss_peak_mb": status_kb("VmHWM") / 1024,
    "answered_by_version": answered,
    "candidate_loaded": rollout is not None,
}))
"""


def second_version(source: Path, target: Path) -> tuple[bytes, bytes]:
    """``source``'s champion copied to ``target`` as v1, and its bundle again as v2; the two manifests."""
    pointer = parse_pointer((source / POINTER).read_bytes())
    folder = source / pointer.manifest.split("/")[0]
    files = {name: (folder / name).read_bytes() for name in parse_manifest((folder / MANIFEST).read_bytes()).files}
    storage = LocalStorage(target)
    manifests = {}
    for version in (1, 2):
        manifest = manifest_bytes(pointer.model_name, version, None, {}, files, datetime.now(UTC).isoformat())
        for name, data in (files | {MANIFEST: manifest}).items():
            put_verified(storage, f"{folder_of(version, sha256(manifest))}/{name}", data)
        manifests[version] = manifest
    return manifests[1], manifests[2]


def run_case(root: Path, name: str, manifests: tuple[bytes, bytes], pool: list[str], runs: int, cpu: int) -> dict:
    """One case (``MODES[name]``) in a fresh process pinned to ``cpu``, with an empty cache."""
    mode = MODES[name]
    candidate = candidate_for(2, manifests[1], mode[0], mode[1], "bench") if mode else None
    point_to(LocalStorage(root), POINTER, "bench", 1, manifests[0], candidate)
    with tempfile.TemporaryDirectory() as cache:
        env = os.environ | {"MODEL_URI": str(root), "MODEL_CACHE_DIR": cache, "CAPTURE_RATE": "1"}
        done = subprocess.run(
            [sys.executable, "-c", WORKER, str(ROOT / "lambda"), str(ROOT)],
            input=json.dumps([pool, runs]),
            capture_output=True,
            text=True,
            env=env,
            preexec_fn=lambda: os.sched_setaffinity(0, {cpu}),
            check=False,
        )
    if done.returncode != 0:
        raise RuntimeError(f"{name}: {done.stderr[-2000:]}")
    return json.loads(done.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-root", type=Path, required=True)
    parser.add_argument("--runs", type=int, default=400)
    parser.add_argument("--cpu", type=int, default=max(os.sched_getaffinity(0)))
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "rollout.json")
    args = parser.parse_args()
    pool = parse_csv(AGNEWS_DIR / "test.csv", 4).text.head(POOL).tolist()
    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp())
    try:
        manifests = second_version(args.model_root, work)
        cases = {name: run_case(work, name, manifests, pool, args.runs, args.cpu) for name in MODES}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    alone = cases["champion"]
    result = {
        "command": " ".join(["python", *sys.argv]),
        "machine": machine(),
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "cpu": args.cpu,
        "cases": cases,
        "ratios": {
            "shadow_p50_vs_champion": cases["shadow"]["p50_ms"] / alone["p50_ms"],
            "canary_p50_vs_champion": cases["canary"]["p50_ms"] / alone["p50_ms"],
            "two_bundles_rss_vs_one": cases["shadow"]["rss_peak_mb"] / alone["rss_peak_mb"],
        },
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["ratios"] | {name: case["p50_ms"] for name, case in cases.items()}, indent=2))


if __name__ == "__main__":
    main()
