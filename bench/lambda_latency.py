"""The Lambda at its floor, and against the torch pyfunc, in one run: the three ratios of serving at the floor
(overhead, cold start, cost), the memory the template should ask for, cold start, warm latency and deployment size
against the pyfunc, the costliest request against a normal one; and all of it against the figures before (the last
commit's).

    python bench/lambda_latency.py tracking.uri=sqlite:///mlflow/mlflow.db [more overrides...]

It serves ``models:/<registry.model_name>@champion``, the model the pipeline promoted (for the issue's targets,
train with ``model=minilm`` first). The mirror step copies that version's bundle into a moto S3 server on
127.0.0.1, from which the handler loads it. A tiny setup runs it in a few minutes: train ``model=tiny`` into a
scratch tracking store, then ``--cold-runs 1 --warm-runs 5 --batch-runs 2 --cost-runs 1 --output /tmp/l.json``.

The Lambda side runs the deployment zip (``make lambda-zip``) unpacked, in processes of the runtime's Python
(``make -s lambda-python``), with boto3, which the runtime ships, installed beside it for that Python (the version
requirements.txt pins).

- cold start: a fresh process that imports the handler and answers one text, with an empty model cache (so the
  model comes from S3), against a fresh process that loads the pyfunc (from a local copy) and predicts one text;
  the median of ``--cold-runs``, seconds from spawning the process to its first answer (the time to its exit, which
  no request waits for, is kept beside it);
- warm: p50 and p95 over ``--warm-runs`` calls of one text, and of a batch of 32, each side in a process of its
  own;
- overhead ratio: the p50 of a warm one-text request (a Function URL event with a request id: event parsing, the
  cut, tokenization, the run, softmax, the capture record and the request's one line on stdout) against the p50 of
  a bare ``session.run`` on the same token ids, in the same process, over the same 200-text pool;
- cold-start ratio: the Lambda's cold start (above) against its floor, a fresh process that imports onnxruntime,
  numpy and tokenizers, makes a session from the bundle's local file (the handler's session options) and runs it
  once (``COLD_FLOOR``), the medians of ``--cold-runs`` on the same CPU;
- cost ratio: the cost of a million one-text answers (the request fee, the GB-seconds of the warm p50 rounded up to
  Lambda's 1 ms at the template's MemorySize, and the log bytes ingested: the request's line as measured,
  CloudWatch's 26 bytes per event, and Lambda's START, END and REPORT lines unless the template's PlatformLogLevel
  leaves them out) against the request fee and compute alone, at the prices named below with their date;
- memory sweep: the warm one-text p50 and the cost per million at 512, 1024, 1769 and 2048 MB, each as the share
  of one CPU that Lambda gives it (memory / 1,769 MB, at most one CPU for this one-thread session), imposed on the
  pinned process by a duty cycle of SIGSTOP and SIGCONT (``DUTY_PERIOD_S``): the cheapest within 10% of the p50 on
  one full vCPU is the memory to ask for (``recommended_memory_mb``);
- phases: where a warm request's time goes inside the handler (bench/lambda_phases.py): event parsing, the cut,
  tokenization, the onnxruntime run, softmax, the capture records and the line, and the share outside the run;
- onnxruntime releases: the phases again, on this project's Python with each release of ``--onnxruntime`` (and
  the zip's) installed for it, on the same bundle: the release is all that differs;
- size: the unzipped Lambda zip (``make lambda-zip``) against the installed size of torch and transformers with
  their dependencies, each with its model files;
- request cost: CPU seconds (median of ``--cost-runs``) and peak RSS of a process of its own that answers one kind
  of request, over HTTP-API events with JSON bodies as a Function URL sends them: a normal request (one text), the
  most the model reads (``MAX_BATCH`` texts of real news, each longer than the model reads), and requests built to
  cost the most within the limits (``MAX_BATCH``, ``MAX_TEXT_CHARS`` and Lambda's 6 MiB payload): dense tokens,
  space before dense tokens (the cut's worst case), words of more than 100 letters, CJK. The worst of them
  against the normal one is the ratio kept;
- before: the same figures from ``bench/results/lambda.json`` as the last commit has it (``--before`` names
  another file), and the ratios of now to then.

Lambda runs a function below 1,769 MB on at most one vCPU: the headline figures (``one_cpu``) pin both sides,
each in processes of its own started on one CPU (``--cpu``, by default the last this process may use), so that each
sizes its threads to it as it would there; the same figures on every CPU this process may use (``all_cpus``) are
beside them. The request costs run on all of them. The machine (bench/machine.py) and the load average before and
after the run are recorded: figures count only from a run alone on the machine.

Figures go to bench/results/lambda.json (``--output`` elsewhere).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
from typing import Any

import boto3
import mlflow
import numpy as np
from cfnlint.decode import decode
from lambda_phases import function_url_event
from machine import machine
from moto.server import ThreadedMotoServer
from packaging.requirements import Requirement
from train_bench import AGNEWS_DIR, RESULTS

from agnews import names
from agnews.config import PROJECT_ROOT, compose
from agnews.data import parse_csv
from agnews.names import CHAMPION
from agnews.packaging import INPUT_EXAMPLE
from agnews.promotion.mirror import mirror
from agnews.pyfunc import BUNDLE_PATH
from agnews.tracking import connect
from bundle.layout import ONNX_FILE
from bundle.predictor import Predictor

LAMBDA_ZIP = PROJECT_ROOT / "build" / "lambda.zip"
BENCH_DIR = Path(__file__).resolve().parent
BUCKET = "bench-models"
BATCH = 32
TORCH_PACKAGE = ("torch", "transformers")  # what a torch-based Lambda would have to ship
# The goals of serving at the floor, on one CPU; the pyfunc ratios are kept beside them, without one.
TARGETS = {"overhead_ratio": 1.08, "cold_start_ratio": 1.6, "cost_ratio": 1.5}
# Prices: AWS us-east-1 list prices, x86, as published on PRICES_DATE (the first tier of each).
PRICES_DATE = "2025-06-01"
REQUEST_PRICE = 0.20 / 1e6  # $ per Lambda request
GB_SECOND_PRICE = 0.0000166667  # $ per Lambda GB-second (x86)
LOG_GB_PRICE = 0.50  # $ per GB (2^30 bytes) ingested into CloudWatch Logs
LOG_EVENT_OVERHEAD = 26  # bytes that CloudWatch Logs counts for each log event beside its message
# What Lambda writes for each invocation in its Text log format, beside the function's own lines.
PLATFORM_LINES = (
    "START RequestId: c6af9ac6-7b61-11e6-9a41-93e8deadbeef Version: 12",
    "END RequestId: c6af9ac6-7b61-11e6-9a41-93e8deadbeef",
    "REPORT RequestId: c6af9ac6-7b61-11e6-9a41-93e8deadbeef\tDuration: 4.42 ms\tBilled Duration: 5 ms\t"
    "Memory Size: 2048 MB\tMax Memory Used: 181 MB\t",
)
PLATFORM_LOG_BYTES = sum(len(line) + 1 + LOG_EVENT_OVERHEAD for line in PLATFORM_LINES)
FULL_VCPU_MB = 1769  # Lambda gives a function one full vCPU at 1,769 MB, and CPU in proportion to memory
MEMORY_SWEEP_MB = (512, 1024, 1769, 2048)
WITHIN_FULL_VCPU = 1.10  # the recommended memory keeps the warm p50 within 10% of one full vCPU's
DUTY_PERIOD_S = 0.02  # the duty cycle's period: a CPU share of s runs s * 20 ms of every 20 ms
ONNXRUNTIME_BEFORE = "1.16.3"  # the python3.11 runtime's release, which served the first wave's figures
NUMPY_FOR_RELEASES = "numpy==1.26.4"  # one numpy that every release compared runs with (1.16.3 predates numpy 2)
MB = 1e6
PAYLOAD_LIMIT = 6 * 1024 * 1024  # Lambda's synchronous request payload
MAX_BATCH, MAX_TEXT_CHARS = 64, 200_000  # lambda/settings.py's defaults

# A fresh process's first answer: the handler's import, then the first request, which loads the model as Lambda's
# init phase would (the model's libraries imported on a thread of their own while boto3 reads the store;
# LoadedModel.load_s: manifest, fetch, session, first run); the fetch's sha256 is timed again on the cached files,
# after the answer.
LAMBDA_COLD = """
import hashlib, json, sys, time
start = time.perf_counter()
sys.path[:0] = [sys.argv[1]]
import handler
imported = time.perf_counter()
response = handler.lambda_handler({"text": sys.argv[2]}, None)
assert response["statusCode"] == 200, response
answered = time.perf_counter()
answered_at = time.time()
model = handler.model_store().get()
hashing = time.perf_counter()
for path in sorted(model.folder.iterdir()):  # what the fetch spent on sha256, of the files it streamed
    with path.open("rb") as stream:
        hashlib.file_digest(stream, "sha256")
print(json.dumps({
    "answered_at": answered_at,
    "import_s": imported - start,
    "first_answer_s": answered - imported,
    "load_s": model.load_s,
    "sha256_s": time.perf_counter() - hashing,
}))
"""

# The cold start's floor: a fresh process that imports what the model needs, makes a session from the bundle's local
# file with the handler's options, and runs it once on the token ids of one text.
COLD_FLOOR = """
import json, sys, time
sys.path[:0] = [sys.argv[1]]
import numpy, onnxruntime, tokenizers
from bundle.predictor import this_process_options
session = onnxruntime.InferenceSession(sys.argv[2], this_process_options(), providers=["CPUExecutionProvider"])
ids = numpy.array([json.loads(sys.argv[3])], dtype=numpy.int64)
session.run(["logits"], {"input_ids": ids, "attention_mask": numpy.ones_like(ids)})
print(json.dumps({"answered_at": time.time()}))
"""

# The packaged handler's warm figures, in a process of its own: latencies of direct invokes, and the phases of a
# Function URL request (bench/lambda_phases.py), with the onnxruntime release and the threads it runs.
LAMBDA_WARM = """
import contextlib, io, json, sys, uuid
sys.path[:0] = sys.argv[1:3]
import handler, onnxruntime
from lambda_phases import function_url_event, phases
from timing import timings
request = json.load(sys.stdin)
pool = request["pool"]

def call(batch):
    response = handler.lambda_handler({"texts": batch}, None)
    assert response["statusCode"] == 200, response

class Context:
    def __init__(self):
        self.aws_request_id = str(uuid.uuid4())

def one_text(batch):
    response = handler.lambda_handler(function_url_event({"text": batch[0]}), Context())
    assert response["statusCode"] == 200, response

call(pool[:1])  # the model loads
predictor = handler.model_store().get().predictor
inputs = {text: predictor.batches([predictor.cut(text)])[0][1] for text in pool}

def bare(batch):
    predictor.session.run(["logits"], inputs[batch[0]])

overhead = {}
if request["overhead_runs"]:
    lines = io.StringIO()
    with contextlib.redirect_stdout(lines):
        for text in pool:
            one_text([text])
    overhead = {
        "line_bytes": len(lines.getvalue().encode()) / len(pool),
        "request": timings(one_text, pool, 1, request["overhead_runs"]),
        "bare": timings(bare, pool, 1, request["overhead_runs"]) if request["bare"] else [],
    }
print(json.dumps({
    "onnxruntime": onnxruntime.__version__,
    "threads": predictor.session.get_session_options().intra_op_num_threads,
    "times": {name: timings(call, pool, size, runs) for name, (size, runs) in request["sizes"].items()},
    "phases": {name: phases(handler, pool[:size], request["phase_runs"]) for name, size in request["phases"].items()},
    "overhead": overhead,
}))
"""

# The pyfunc's warm latencies, in a process of its own: started on the CPUs it is given, torch sizes its threads
# to them.
PYFUNC_WARM = """
import json, sys
sys.path[:0] = [sys.argv[2]]
import mlflow, pandas as pd, torch
from timing import timings
model = mlflow.pyfunc.load_model(sys.argv[1])
pool, sizes = json.load(sys.stdin)

def call(batch):
    return model.predict(pd.DataFrame({"text": batch}))

times = {name: timings(call, pool, size, runs) for name, (size, runs) in sizes.items()}
print(json.dumps({"threads": torch.get_num_threads(), "times": times}))
"""

# One kind of request, in a process of its own: the warm-up loads the model, then CPU seconds per request and the
# process's peak RSS while it answers (VmHWM, reset to the RSS of the warm process first; getrusage's ru_maxrss
# would carry the peak of the benchmark process that spawned it).
LAMBDA_COST = """
import json, sys, time
sys.path[:0] = [sys.argv[1]]
import handler

def status_kb(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))

warm_up, event, runs = json.load(sys.stdin)
assert handler.lambda_handler(warm_up, None)["statusCode"] == 200
rss_before = status_kb("VmRSS")
with open("/proc/self/clear_refs", "w") as clear:
    clear.write("5")  # the peak RSS starts again from the RSS now
cpu = []
for _ in range(runs):
    began = time.process_time()
    response = handler.lambda_handler(event, None)
    cpu.append(time.process_time() - began)
    assert response["statusCode"] == 200, response["body"][:300]
print(json.dumps({"cpu_s": cpu, "peak_rss_kb": status_kb("VmHWM"), "rss_before_kb": rss_before}))
"""

PYFUNC_COLD = """
import json, sys, time
start = time.perf_counter()
import mlflow, pandas as pd
imported = time.perf_counter()
model = mlflow.pyfunc.load_model(sys.argv[1])
loaded = time.perf_counter()
model.predict(pd.DataFrame({"text": [sys.argv[2]]}))
answered = time.perf_counter()
print(json.dumps({
    "answered_at": time.time(),
    "import_s": imported - start,
    "load_s": loaded - imported,
    "first_answer_s": answered - loaded,
}))
"""


def texts() -> list[str]:
    """AG News test texts where the local copy is present, else the train step's input example."""
    path = AGNEWS_DIR / "test.csv"
    return parse_csv(path, n_labels=4).text.tolist() if path.is_file() else list(INPUT_EXAMPLE)


def folder_size(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def installed_size(roots: tuple[str, ...]) -> tuple[int, list[str]]:
    """Bytes on disk of ``roots`` and everything they require (extras left out), as installed here."""
    seen: dict[str, int] = {}
    todo = list(roots)
    while todo:
        name = todo.pop()
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            continue
        key = dist.metadata["Name"].lower().replace("_", "-")
        if key in seen:
            continue
        files = [f for f in dist.files or [] if f.parts[0] != ".."]
        seen[key] = sum(Path(dist.locate_file(f)).stat().st_size for f in files if Path(dist.locate_file(f)).is_file())
        for line in dist.requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return sum(seen.values()), sorted(seen)


def lambda_package(folder: Path) -> int:
    """Build (or find up to date) the deployment zip with ``make lambda-zip``, unpack it into ``folder``, and return
    its unzipped bytes."""
    subprocess.run(
        ["make", "-o", ".venv/.installed", "lambda-zip", f"PY={sys.executable}"], cwd=PROJECT_ROOT, check=True
    )
    with zipfile.ZipFile(LAMBDA_ZIP) as archive:
        archive.extractall(folder)
        return sum(info.file_size for info in archive.infolist())


def lambda_python() -> str:
    """The runtime's Python here (``make -s lambda-python``), which runs the unpacked zip."""
    found = subprocess.run(["make", "-s", "lambda-python"], cwd=PROJECT_ROOT, capture_output=True, text=True)
    if not found.stdout.strip():
        sys.exit("no interpreter of the Lambda runtime's Python here: set LAMBDA_PY, or install it with pyenv")
    return found.stdout.strip()


def runtime_packages(python: str, folder: Path) -> Path:
    """What the Lambda runtime ships beside the zip, installed and compiled for its Python into ``folder``: boto3, at
    the version that requirements.txt pins (pure Python, so any platform's wheels do)."""
    requirements = (PROJECT_ROOT / "requirements.txt").read_text().splitlines()
    boto3_pin = next(line.strip() for line in requirements if line.startswith("boto3=="))
    version = subprocess.run(
        [python, "-c", "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--only-binary=:all:", "--implementation", "cp"]
    target = ["--python-version", version, "--platform", "manylinux2014_x86_64", "--target", str(folder)]
    subprocess.run([*pip, *target, boto3_pin], check=True)
    # compiled for the runtime's Python, as the runtime ships it (pip compiled it for this one)
    subprocess.run([python, "-m", "compileall", "-q", "-j", "0", str(folder)], check=True)
    return folder


def pinned(cpu: int | None) -> Callable[[], None] | None:
    """A ``preexec_fn`` that starts a process on ``cpu`` alone; None (every CPU this process may use) for None."""
    return None if cpu is None else functools.partial(os.sched_setaffinity, 0, {cpu})


def cold_starts(
    python: str, code: str, args: list[str], env: dict[str, str], runs: int, cpu: int | None
) -> dict[str, Any]:
    """Median seconds from spawning a fresh process (on ``cpu``) to its first answer, over ``runs`` processes; with
    the time to the process's exit, and the phases the last one reported."""
    answers, exits, phases = [], [], {}
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as cache:
            spawned, started = time.time(), time.perf_counter()
            done = subprocess.run(
                [python, "-c", code, *args],
                env=env | {"MODEL_CACHE_DIR": cache},
                preexec_fn=pinned(cpu),
                capture_output=True,
                text=True,
                check=True,
            )
            exits.append(time.perf_counter() - started)
        phases = json.loads(done.stdout.splitlines()[-1])
        answers.append(phases.pop("answered_at") - spawned)
    return {"median_s": statistics.median(answers), "runs_s": answers, "to_exit_s": exits, "phases_s": phases}


def summary(times: list[float]) -> dict[str, float]:
    return {"p50_ms": float(np.percentile(times, 50)), "p95_ms": float(np.percentile(times, 95)), "runs": len(times)}


@contextlib.contextmanager
def duty_cycle(pid: int, share: float) -> Iterator[None]:
    """Process ``pid`` held to ``share`` of its CPU while the block runs: stopped (SIGSTOP) for the rest of every
    ``DUTY_PERIOD_S``, as a CPU quota throttles it; nothing for a share of 1 or more."""
    if share >= 1:
        yield
        return
    done = threading.Event()

    def cycle() -> None:
        with contextlib.suppress(ProcessLookupError):
            while not done.is_set():
                os.kill(pid, signal.SIGCONT)
                time.sleep(share * DUTY_PERIOD_S)
                os.kill(pid, signal.SIGSTOP)
                time.sleep((1 - share) * DUTY_PERIOD_S)
            os.kill(pid, signal.SIGCONT)

    thread = threading.Thread(target=cycle, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def lambda_warm(
    python: str, paths: list[str], env: dict[str, str], request: dict, cpu: int | None, share: float = 1.0
) -> dict[str, Any]:
    """The handler's warm figures (LAMBDA_WARM) in a process of its own on ``cpu`` (held to ``share`` of it), with
    the handler and the bench's modules first on its path (``paths``)."""
    process = subprocess.Popen(
        [python, "-c", LAMBDA_WARM, *paths],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        preexec_fn=pinned(cpu),
        text=True,
    )
    with duty_cycle(process.pid, share):
        out, err = process.communicate(json.dumps(request))
    if process.returncode != 0:
        raise RuntimeError(f"the warm process failed: {err[-2000:]}")
    result = json.loads(out.splitlines()[-1])
    overhead = result["overhead"]
    if overhead:
        overhead |= {name: summary(overhead[name]) for name in ("request", "bare") if overhead[name]}
    return result | {"times": {name: summary(times) for name, times in result["times"].items()}}


def cost_per_million(p50_ms: float, memory_mb: int, line_bytes: float, platform_bytes: int) -> dict[str, float]:
    """Dollars for a million one-text answers at ``memory_mb``: the request fee, the compute (the p50 billed by
    Lambda's 1 ms), and the log bytes ingested (the line and CloudWatch's per-event bytes, and ``platform_bytes`` of
    Lambda's own lines); ``ratio`` is the total against the fee and compute alone."""
    million = 1e6
    request = REQUEST_PRICE * million
    compute = math.ceil(p50_ms) / 1000 * memory_mb / 1024 * GB_SECOND_PRICE * million
    log_bytes = line_bytes + LOG_EVENT_OVERHEAD + platform_bytes
    logs = log_bytes * million / 2**30 * LOG_GB_PRICE
    total = request + compute + logs
    return {
        "request": request,
        "compute": compute,
        "logs": logs,
        "log_bytes": log_bytes,
        "total": total,
        "ratio": total / (request + compute),
    }


def template_defaults() -> tuple[int, int]:
    """The MemorySize that lambda/template.yaml asks for by default, and the bytes of Lambda's own lines an invocation
    at its default PlatformLogLevel (none at WARN)."""
    template, problems = decode(str(PROJECT_ROOT / "lambda" / "template.yaml"))
    assert not problems, problems
    parameters = template["Parameters"]
    platform = 0 if parameters["PlatformLogLevel"]["Default"] == "WARN" else PLATFORM_LOG_BYTES
    return int(parameters["MemorySize"]["Default"]), platform


def memory_sweep(
    python: str, paths: list[str], env: dict[str, str], pool: list[str], runs: int, cpu: int
) -> dict[str, Any]:
    """The warm one-text p50 and the cost per million at each of MEMORY_SWEEP_MB, as its share of ``cpu``; and the
    cheapest memory whose p50 is within WITHIN_FULL_VCPU of one full vCPU's."""
    request = {"pool": pool, "sizes": {}, "phases": {}, "phase_runs": 0, "overhead_runs": runs, "bare": False}
    _, platform = template_defaults()
    sweep = {}
    for memory in MEMORY_SWEEP_MB:
        share = min(1.0, memory / FULL_VCPU_MB)
        overhead = lambda_warm(python, paths, env, request, cpu, share)["overhead"]
        p50 = overhead["request"]["p50_ms"]
        sweep[str(memory)] = {
            "cpu_share": share,
            "p50_ms": p50,
            "cost_per_million": cost_per_million(p50, memory, overhead["line_bytes"], platform),
        }
    full = sweep[str(FULL_VCPU_MB)]["p50_ms"]
    within = [m for m in MEMORY_SWEEP_MB if sweep[str(m)]["p50_ms"] <= WITHIN_FULL_VCPU * full]
    recommended = min(within, key=lambda m: sweep[str(m)]["cost_per_million"]["total"])
    return {"settings": sweep, "duty_period_s": DUTY_PERIOD_S, "recommended_memory_mb": recommended}


def pyfunc_warm(pyfunc_dir: str, pool: list[str], sizes: dict[str, tuple[int, int]], cpu: int | None) -> dict:
    """The pyfunc's warm latencies (PYFUNC_WARM) in a process of its own on ``cpu``."""
    done = subprocess.run(
        [sys.executable, "-c", PYFUNC_WARM, pyfunc_dir, str(BENCH_DIR)],
        input=json.dumps([pool, sizes]),
        preexec_fn=pinned(cpu),
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(done.stdout.splitlines()[-1])
    return result | {"times": {name: summary(times) for name, times in result["times"].items()}}


def onnxruntime_releases(
    releases: list[str], folder: Path, env: dict[str, str], request: dict, cpu: int | None
) -> dict[str, Any]:
    """The phases of warm requests on the same bundle with each onnxruntime release, on this project's Python (the
    oldest release has no wheel for the runtime's), each installed into a folder of its own with one numpy for all."""
    phases = {}
    for release in releases:
        target = folder / f"onnxruntime-{release}"
        pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--only-binary=:all:"]
        subprocess.run([*pip, "--target", str(target), f"onnxruntime=={release}", NUMPY_FOR_RELEASES], check=True)
        paths = [str(PROJECT_ROOT / "lambda"), str(BENCH_DIR)]
        phases[release] = lambda_warm(sys.executable, paths, env | {"PYTHONPATH": str(target)}, request, cpu)["phases"]
    return phases


def platform_version(python: str) -> str:
    return subprocess.run([python, "-V"], capture_output=True, text=True, check=True).stdout.strip()


def filled(text: str) -> dict:
    """As many copies of ``text`` (cut to MAX_TEXT_CHARS) as MAX_BATCH and the payload limit allow, in one request."""
    text = text[:MAX_TEXT_CHARS]
    size = len(json.dumps(text, ensure_ascii=False).encode()) + 2
    count = min(MAX_BATCH, (PAYLOAD_LIMIT - 100) // size)
    return {"texts": [text] * count}


def cost_requests(pool: list[str]) -> dict[str, dict]:
    """The requests whose cost is measured: a normal one, the most the model reads, and ones built to cost most."""
    article = " ".join(sorted(pool, key=len)[-40:])  # real news, far longer than the model reads
    return {
        "normal": {"text": pool[0]},
        "most_read": {"texts": [article[i:] for i in range(MAX_BATCH)]},
        "dense_tokens": filled("a!" * MAX_TEXT_CHARS),  # a token a character: the one the issue measured
        "space_then_dense": filled(" " * (MAX_TEXT_CHARS // 2) + "a!" * MAX_TEXT_CHARS),
        "long_words": filled(("b" * 101 + " ") * MAX_TEXT_CHARS),  # each a single [UNK], 102 characters apart
        "cjk": filled("東京株式市場で日経平均株価が続伸した。" * 20_000),
    }


def request_costs(python: str, package: Path, env: dict[str, str], pool: list[str], runs: int) -> dict:
    """CPU seconds and peak RSS of each request of ``cost_requests``, each in a fresh process of its own."""
    costs = {}
    for name, payload in cost_requests(pool).items():
        event = function_url_event(payload)
        done = subprocess.run(
            [python, "-c", LAMBDA_COST, str(package)],
            input=json.dumps([{"text": pool[1]}, event, runs]),
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        cost = json.loads(done.stdout.splitlines()[-1])
        costs[name] = {
            "texts": len(payload.get("texts", [0])),
            "body_bytes": len(event["body"].encode()),
            "cpu_s": statistics.median(cost["cpu_s"]),
            "cpu_runs_s": cost["cpu_s"],
            names.PEAK_RSS_MB: cost["peak_rss_kb"] * 1024 / MB,
            "rss_growth_mb": (cost["peak_rss_kb"] - cost["rss_before_kb"]) * 1024 / MB,
        }
    normal = costs["normal"]

    def worst_of(requests: list[str]) -> dict:
        worst = max(requests, key=lambda name: costs[name]["cpu_s"])
        return {
            "request": worst,
            "cpu_against_normal": costs[worst]["cpu_s"] / normal["cpu_s"],
            "peak_rss_against_normal": costs[worst][names.PEAK_RSS_MB] / normal[names.PEAK_RSS_MB],
            "cpu_against_most_read": costs[worst]["cpu_s"] / costs["most_read"]["cpu_s"],
        }

    return {
        "requests": costs,
        "worst": worst_of([name for name in costs if name != "normal"]),
        # of the requests built to cost more than what the model reads: none should cost more than most_read
        "worst_built": worst_of([name for name in costs if name not in ("normal", "most_read")]),
        "limits": {"max_batch": MAX_BATCH, "max_text_chars": MAX_TEXT_CHARS, "payload_bytes": PAYLOAD_LIMIT},
    }


def before_figures(path: Path | None) -> dict | None:
    """The figures of an earlier run: ``path``, or bench/results/lambda.json as the last commit has it."""
    if path is not None:
        return {"source": str(path)} | json.loads(path.read_text())
    relative = (RESULTS / "lambda.json").relative_to(PROJECT_ROOT).as_posix()
    shown = subprocess.run(["git", "show", f"HEAD:{relative}"], cwd=PROJECT_ROOT, capture_output=True, text=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True)
    if shown.returncode != 0:
        return None
    return {"source": f"{relative} at commit {commit.stdout.strip()}"} | json.loads(shown.stdout)


def on_all_cpus(section: dict) -> dict:
    """A section's figures on every CPU (a result from before the one-CPU headline holds only those, unnamed)."""
    return section.get("all_cpus", section)


def against(before: dict | None, now: dict) -> dict | None:
    """Now against before, for the figures both runs have: cold start, warm p50s (all on every CPU, as runs before
    the one-CPU headline measured them) and package size."""
    if before is None:
        return None
    pick = {
        "cold_start_s": lambda r: on_all_cpus(r["cold_start"])["lambda"]["median_s"],
        "warm_p50_one_text_ms": lambda r: lambda_p50(on_all_cpus(r["warm"]), "one_text"),
        f"warm_p50_batch_{BATCH}_ms": lambda r: lambda_p50(on_all_cpus(r["warm"]), f"batch_{BATCH}"),
        "lambda_package_mb": lambda r: r["size"]["lambda_package_mb"],
    }
    figures = {name: {"before": get(before), "now": get(now)} for name, get in pick.items()}
    return {
        "source": before["source"],
        "before_command": before.get("command"),
        "figures": figures,
        "ratios": {name: pair["now"] / pair["before"] for name, pair in figures.items()},
    }


def lambda_p50(warm: dict, name: str) -> float:
    side = warm["lambda"]
    return side.get("times", side)[name]["p50_ms"]


def speedups(cold: dict, warm: dict) -> dict[str, float]:
    """The Lambda against the pyfunc, for one placement: warm p50s and cold start."""
    return {
        "warm_p50_speedup_one_text": warm["pyfunc"]["times"]["one_text"]["p50_ms"] / lambda_p50(warm, "one_text"),
        f"warm_p50_speedup_batch_{BATCH}": warm["pyfunc"]["times"][f"batch_{BATCH}"]["p50_ms"]
        / lambda_p50(warm, f"batch_{BATCH}"),
        "cold_start_speedup": cold["pyfunc"]["median_s"] / cold["lambda"]["median_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides: tracking.uri=..., registry.model_name=...")
    parser.add_argument("--cold-runs", type=int, default=5)
    parser.add_argument("--warm-runs", type=int, default=200)
    parser.add_argument("--batch-runs", type=int, default=40)
    parser.add_argument("--phase-runs", type=int, default=200, help="rounds of the phase breakdown")
    parser.add_argument("--cost-runs", type=int, default=3, help="runs of each request whose cost is measured")
    parser.add_argument("--sweep-runs", type=int, default=100, help="one-text requests at each memory of the sweep")
    parser.add_argument("--cpu", type=int, help="the one CPU of the headline (default: the last this process may use)")
    parser.add_argument(
        "--onnxruntime", nargs="*", default=[ONNXRUNTIME_BEFORE], help="releases to compare with the zip's"
    )
    parser.add_argument("--output", type=Path, default=RESULTS / "lambda.json")
    parser.add_argument("--before", type=Path, help="an earlier run's JSON (default: the last commit's)")
    args = parser.parse_args()
    load_before = os.getloadavg()
    before = before_figures(args.before)
    placements = {"one_cpu": max(os.sched_getaffinity(0)) if args.cpu is None else args.cpu, "all_cpus": None}

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    s3_env = {
        "S3_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_REGION": "us-east-1",
    }
    os.environ.update(s3_env)
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
    cfg = compose([*args.overrides, f"storage.uri=s3://{BUCKET}"])
    connect(cfg.tracking)
    mirrored = mirror(cfg.registry, cfg.storage)
    model_root = f"s3://{BUCKET}/{cfg.storage.model_prefix}/{cfg.registry.model_name}"
    pool = texts()
    python = lambda_python()

    sizes = {"one_text": (1, args.warm_runs), f"batch_{BATCH}": (BATCH, args.batch_runs)}
    phase_sizes = {name: size for name, (size, _) in sizes.items()}
    with tempfile.TemporaryDirectory() as tmp:
        package = Path(tmp) / "package"
        package_bytes = lambda_package(package)
        runtime = runtime_packages(python, Path(tmp) / "runtime")
        lambda_env = os.environ | s3_env | {"MODEL_URI": model_root, "PYTHONPATH": str(runtime)}
        pyfunc_dir = mlflow.artifacts.download_artifacts(f"models:/{cfg.registry.model_name}@{CHAMPION}", dst_path=tmp)
        warm_env = lambda_env | {"MODEL_CACHE_DIR": str(Path(tmp) / "cache")}
        bundle_dir = Path(pyfunc_dir) / BUNDLE_PATH
        local = Predictor(bundle_dir)
        ids = local.batches([local.cut(pool[0])])[0][1]["input_ids"][0].tolist()
        floor_args = [str(package), str(bundle_dir / ONNX_FILE), json.dumps(ids)]
        cold, warm = {}, {}
        for placement, cpu in placements.items():
            cold[placement] = {
                "lambda": cold_starts(python, LAMBDA_COLD, [str(package), pool[0]], lambda_env, args.cold_runs, cpu),
                "floor": cold_starts(python, COLD_FLOOR, floor_args, lambda_env, args.cold_runs, cpu),
                "pyfunc": cold_starts(
                    sys.executable, PYFUNC_COLD, [pyfunc_dir, pool[0]], dict(os.environ), args.cold_runs, cpu
                ),
            }
            # the phases on the headline's CPU only
            request = {"pool": pool, "sizes": sizes, "phases": phase_sizes if cpu is not None else {}}
            request |= {"phase_runs": args.phase_runs, "overhead_runs": args.warm_runs if cpu is not None else 0}
            request["bare"] = True
            warm[placement] = {
                "lambda": lambda_warm(python, [str(package), str(BENCH_DIR)], warm_env, request, cpu),
                "pyfunc": pyfunc_warm(pyfunc_dir, pool, sizes, cpu),
            }
        one_cpu = placements["one_cpu"]
        paths = [str(package), str(BENCH_DIR)]
        sweep = memory_sweep(python, paths, warm_env, pool, args.sweep_runs, one_cpu)
        releases_request = {"pool": pool, "sizes": {}, "phases": phase_sizes, "phase_runs": args.phase_runs}
        releases_request |= {"overhead_runs": 0, "bare": False}
        zip_release = warm["one_cpu"]["lambda"]["onnxruntime"]
        releases = onnxruntime_releases(
            [*args.onnxruntime, zip_release], Path(tmp) / "releases", warm_env, releases_request, one_cpu
        )
        request_cost = request_costs(python, package, warm_env, pool, args.cost_runs)
        torch_model = folder_size(Path(pyfunc_dir) / "artifacts" / "model")
        bundle = folder_size(Path(pyfunc_dir) / BUNDLE_PATH)

    torch_package, torch_dists = installed_size(TORCH_PACKAGE)
    size = {
        "lambda_package_mb": package_bytes / MB,
        "lambda_model_mb": bundle / MB,
        "torch_package_mb": torch_package / MB,
        "torch_model_mb": torch_model / MB,
        "torch_package_distributions": torch_dists,
    }
    headline = speedups(cold["one_cpu"], warm["one_cpu"])
    overhead = warm["one_cpu"]["lambda"]["overhead"]
    memory, platform = template_defaults()
    answer_cost = cost_per_million(overhead["request"]["p50_ms"], memory, overhead["line_bytes"], platform)
    floor = {
        "overhead_ratio": overhead["request"]["p50_ms"] / overhead["bare"]["p50_ms"],
        "cold_start_ratio": cold["one_cpu"]["lambda"]["median_s"] / cold["one_cpu"]["floor"]["median_s"],
        "cost_ratio": answer_cost["ratio"],
    }
    ratios = (
        floor
        | {"pyfunc": headline}
        | {
            "on_all_cpus": speedups(cold["all_cpus"], warm["all_cpus"]),
            "size_ratio": (size["lambda_package_mb"] + size["lambda_model_mb"])
            / (size["torch_package_mb"] + size["torch_model_mb"]),
            "outside_the_model_share_of_warm_p50": warm["one_cpu"]["lambda"]["phases"]["one_text"][
                "outside_the_model_share"
            ],
        }
    )
    result = {
        "model": f"models:/{cfg.registry.model_name}/{mirrored.version}",
        "placements": placements,
        "cold_start": cold,
        "warm": warm,
        "onnxruntime_releases": {"cpu": one_cpu, "zip": zip_release, "phases": releases},
        "size": size,
        "ratios": ratios,
        "targets": TARGETS,
        "targets_met": {name: floor[name] <= goal for name, goal in TARGETS.items()},
        "floor": {
            "overhead": overhead,
            "cold_start_s": {name: cold["one_cpu"][name]["median_s"] for name in ("lambda", "floor")},
            "cost_per_million": answer_cost | {"memory_mb": memory},
            "prices": {
                "date": PRICES_DATE,
                "request": REQUEST_PRICE,
                "gb_second": GB_SECOND_PRICE,
                "log_gb": LOG_GB_PRICE,
                "platform_log_bytes": platform,
            },
        },
        "memory_sweep": sweep,
        "request_cost": request_cost,
        "runtime": {"python": python, "python_version": platform_version(python)},
        "command": " ".join(["python bench/lambda_latency.py", *sys.argv[1:]]),
        "machine": machine() | {"load_avg_before": list(load_before), "load_avg_after": list(os.getloadavg())},
    }
    result["against_before"] = against(before, result)
    server.stop()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
