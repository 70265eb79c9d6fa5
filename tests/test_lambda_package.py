"""Packaging of the Lambda: pinned requirements, the SAM template, the container file and the deployment zip."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest
from cfnlint.decode import decode
from lambda_fixtures import LAMBDA_DIR, SEED_TEXT, LambdaPackage, invoke_packaged, lambda_python

from steps.config import PROJECT_ROOT

ZIP_LIMIT = 250 * 1024 * 1024  # AWS: 262,144,000 bytes unzipped for a zip package
RUNTIME_GLIBC = (2, 26)  # Amazon Linux 2, under the python3.11 runtime
CODE = ("handler.py", "model_store.py", "predictor.py", "settings.py")
NOT_IN_PACKAGE = ("torch", "transformers", "huggingface_hub", "steps", "boto3", "sympy", "google")


def pins(path: Path) -> dict[str, str]:
    lines = [line.strip() for line in path.read_text().splitlines()]
    return dict(line.split("==") for line in lines if line and not line.startswith("#"))


def test_requirements_pin_the_runtime_wheels_and_the_project_tokenizer() -> None:
    lambda_pins = pins(LAMBDA_DIR / "requirements.txt")
    assert set(lambda_pins) == {"numpy", "onnxruntime", "tokenizers"}
    # tokenizer.json is written by the project's tokenizers; the Lambda reads it with the same release
    assert lambda_pins["tokenizers"] == pins(PROJECT_ROOT / "requirements.txt")["tokenizers"] == version("tokenizers")


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


def test_lambda_zip_fits_and_targets_the_runtime(lambda_package: LambdaPackage) -> None:
    target = lambda_python()
    with zipfile.ZipFile(lambda_package.zip) as archive:
        unzipped = sum(info.file_size for info in archive.infolist())
        names = archive.namelist()
        tags = wheel_tags(archive)
    assert unzipped <= ZIP_LIMIT
    assert f"{unzipped / 2**20:.1f} MiB unzipped (AWS limit 250 MiB)" in lambda_package.make_output
    assert set(CODE) <= set(names)
    # bytecode for the runtime's Python, valid whatever mtimes the unzip gives (PEP 552 flags: hash-based, unchecked)
    tag = f"cpython-{target.replace('.', '')}"
    pycs = {name for name in names if name.endswith(".pyc")}
    assert {f"__pycache__/{Path(code).stem}.{tag}.pyc" for code in CODE} <= pycs
    assert "numpy/__pycache__/__init__." + tag + ".pyc" in pycs
    with zipfile.ZipFile(lambda_package.zip) as archive:
        assert {int.from_bytes(archive.read(name)[4:8], "little") for name in pycs} == {0b01}
    assert {n.split("/")[0] for n in names}.isdisjoint(NOT_IN_PACKAGE)
    assert len(tags) >= len(pins(LAMBDA_DIR / "requirements.txt"))
    for tag in tags:
        python, abi, platform = tag.split("-")
        assert python == "cp" + target.replace(".", "") or abi == "abi3", tag
        assert glibc_needed(platform) <= RUNTIME_GLIBC, tag


def test_unpacked_zip_alone_answers_as_the_handler_does(
    lambda_package: LambdaPackage, mirror_root: Path, serve, tmp_path: Path
) -> None:
    """The shipped wheels (onnxruntime 1.16.3) run the bundle that the project's onnxruntime wrote, and agree."""
    (packaged,) = invoke_packaged(lambda_package.folder, mirror_root, tmp_path / "cache", [{"text": SEED_TEXT}])
    assert packaged["statusCode"] == 200
    assert packaged["body"]["model_version"] == 1
    here = serve(mirror_root)({"text": SEED_TEXT})["body"]
    assert packaged["body"]["predicted_class"] == here["predicted_class"]
    assert packaged["body"]["probabilities"] == pytest.approx(here["probabilities"], abs=1e-3)
