"""Packaging of the Lambda: pinned requirements, the SAM template, the container file and the deployment zip."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import zipfile
from importlib.metadata import distribution, version
from pathlib import Path

import pytest
from cfnlint.decode import decode
from lambda_fixtures import LAMBDA_DIR, SEED_TEXT

from steps.config import PROJECT_ROOT

ZIP_LIMIT = 250 * 1024 * 1024  # AWS: 262,144,000 bytes unzipped for a zip package
RUNTIME_GLIBC = (2, 34)  # Amazon Linux 2023, under the python3.12 runtime
CODE = ("handler.py", "model_store.py", "predictor.py", "settings.py")
NOT_IN_PACKAGE = ("torch", "transformers", "huggingface_hub", "steps", "boto3", "sympy", "google")


def pins(path: Path) -> dict[str, str]:
    lines = [line.strip() for line in path.read_text().splitlines()]
    return dict(line.split("==") for line in lines if line and not line.startswith("#"))


def lambda_python() -> str:
    return re.search(r"^LAMBDA_PYTHON \?= (\S+)$", (PROJECT_ROOT / "Makefile").read_text(), re.M).group(1)


def run_packaged_handler(package: Path, model_root: Path, cache: Path) -> dict:
    """Answer the seed's example in a process that sees only ``package``: no site-packages (-S), no project."""
    code = (
        "import json, sys; sys.path[:0] = [sys.argv[1]]; import handler; "
        "print(json.dumps(handler.lambda_handler({'text': sys.argv[2]}, None)))"
    )
    done = subprocess.run(
        [sys.executable, "-S", "-c", code, str(package), SEED_TEXT],
        env={"MODEL_URI": str(model_root), "MODEL_CACHE_DIR": str(cache)},
        cwd=cache.parent,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_requirements_pin_the_versions_the_project_uses() -> None:
    lambda_pins = pins(LAMBDA_DIR / "requirements.txt")
    project_pins = pins(PROJECT_ROOT / "requirements.txt")
    assert set(lambda_pins) == {"numpy", "onnxruntime", "tokenizers"}
    for name, pinned in lambda_pins.items():
        assert pinned == project_pins.get(name, pinned) == version(name)


def test_sam_template_passes_cfn_lint_and_grants_only_reading_the_model() -> None:
    template_file = LAMBDA_DIR / "template.yaml"
    done = subprocess.run([Path(sys.executable).with_name("cfn-lint"), str(template_file)], capture_output=True)
    assert done.returncode == 0, done.stdout.decode()
    template, problems = decode(str(template_file))
    assert not problems
    function = template["Resources"]["ClassifierFunction"]["Properties"]
    assert function["Runtime"] == f"python{lambda_python()}"
    assert function["Handler"] == "handler.lambda_handler"
    assert "FunctionUrlConfig" in function
    (policy,) = function["Policies"]
    (statement,) = policy["Statement"]
    assert statement["Effect"] == "Allow"
    assert statement["Action"] == "s3:GetObject"
    assert statement["Resource"] == {"Fn::Sub": "arn:${AWS::Partition}:s3:::${ModelBucket}/${ModelPrefix}/*"}


def test_container_file_uses_the_lambda_base_image_and_the_code() -> None:
    dockerfile = (LAMBDA_DIR / "Dockerfile").read_text()
    assert f"FROM public.ecr.aws/lambda/python:{lambda_python()}\n" in dockerfile
    assert f"COPY {' '.join(CODE)} ${{LAMBDA_TASK_ROOT}}/" in dockerfile
    assert 'CMD ["handler.lambda_handler"]' in dockerfile


def test_the_installed_requirements_alone_run_the_handler_and_fit(mirror_root: Path, tmp_path: Path) -> None:
    """The cheap check: this environment's copies of lambda/requirements.txt, in a folder of their own."""
    package = tmp_path / "package"
    package.mkdir()
    size = 0
    for name in pins(LAMBDA_DIR / "requirements.txt"):
        files = [f for f in distribution(name).files if f.parts[0] != ".."]
        size += sum(Path(distribution(name).locate_file(f)).stat().st_size for f in files)
        for top in {f.parts[0] for f in files}:
            (package / top).symlink_to(Path(distribution(name).locate_file(top)))
    for name in CODE:
        (package / name).symlink_to(LAMBDA_DIR / name)
    assert size <= ZIP_LIMIT
    response = run_packaged_handler(package, mirror_root, tmp_path / "cache")
    assert response["statusCode"] == 200
    assert response["body"]["model_version"] == 1


def build_zip(tmp_path: Path, python: str) -> tuple[Path, str]:
    """``make lambda-zip`` into tmp_path for ``python``; returns the zip and make's output."""
    out = tmp_path / f"lambda-{python}.zip"
    done = subprocess.run(
        [
            "make",
            "-o",
            ".venv/.installed",
            "lambda-zip",
            f"PY={sys.executable}",
            f"LAMBDA_PYTHON={python}",
            f"LAMBDA_BUILD={tmp_path / f'build-{python}'}",
            f"LAMBDA_ZIP={out}",
        ],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return out, done.stdout


def glibc_needed(platform: str) -> tuple[int, int]:
    """The glibc version that a manylinux x86_64 platform tag requires."""
    if platform == "manylinux2014_x86_64":
        return (2, 17)
    major, minor = re.fullmatch(r"manylinux_(\d+)_(\d+)_x86_64", platform).groups()
    return int(major), int(minor)


def wheel_tags(archive: zipfile.ZipFile) -> list[str]:
    wheels = [n for n in archive.namelist() if n.endswith(".dist-info/WHEEL")]
    return [
        line.split(": ")[1] for n in wheels for line in archive.read(n).decode().splitlines() if line.startswith("Tag")
    ]


def test_lambda_zip_fits_and_targets_the_runtime(tmp_path: Path) -> None:
    target = lambda_python()
    path, output = build_zip(tmp_path, target)
    with zipfile.ZipFile(path) as archive:
        unzipped = sum(info.file_size for info in archive.infolist())
        names = archive.namelist()
        tags = wheel_tags(archive)
    assert unzipped <= ZIP_LIMIT
    assert f"{unzipped / 2**20:.1f} MiB unzipped (AWS limit 250 MiB)" in output
    assert set(CODE) <= set(names)
    assert {n.split("/")[0] for n in names}.isdisjoint(NOT_IN_PACKAGE)
    for tag in tags:
        python, abi, platform = tag.split("-")
        assert python == "cp" + target.replace(".", "") or abi == "abi3", tag
        assert glibc_needed(platform) <= RUNTIME_GLIBC, tag


@pytest.mark.slow
def test_lambda_zip_runs_unpacked(mirror_root: Path, tmp_path: Path) -> None:
    """The same recipe for this interpreter's Python version, unpacked and run with nothing else on the path."""
    path, _ = build_zip(tmp_path, f"{sys.version_info.major}.{sys.version_info.minor}")
    unpacked = tmp_path / "unpacked"
    with zipfile.ZipFile(path) as archive:
        archive.extractall(unpacked)
    response = run_packaged_handler(unpacked, mirror_root, tmp_path / "cache")
    assert response["statusCode"] == 200
    assert response["body"]["model_version"] == 1
