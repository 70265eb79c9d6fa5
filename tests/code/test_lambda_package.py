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
from docker.utils.build import exclude_paths

from agnews.config import PROJECT_ROOT
from tests.helpers import LAMBDA_DIR, SEED_TEXT, LambdaPackage, invoke_packaged, lambda_python

ZIP_LIMIT = 250 * 1024 * 1024  # AWS: 262,144,000 bytes unzipped for a zip package
RUNTIME_GLIBC = (2, 34)  # Amazon Linux 2023, under the python3.12 and python3.13 runtimes
# The project's files in the package (zip and image), by their path in the project: the handler's modules at the
# root (/var/task), the serving contract as the package bundle/.
CODE = {
    "lambda/handler.py": "handler.py",
    "lambda/events.py": "events.py",
    "lambda/model_store.py": "model_store.py",
    "lambda/settings.py": "settings.py",
    "bundle/__init__.py": "bundle/__init__.py",
    "bundle/capture.py": "bundle/capture.py",
    "bundle/layout.py": "bundle/layout.py",
    "bundle/predictor.py": "bundle/predictor.py",
}
UNUSED = re.compile(
    r"onnxruntime/(capi/libonnxruntime\.so|transformers/|quantization/|tools/)|numpy/(.+/)?tests/|numpy/f2py/|.+\.pyi$"
)
NOT_IN_PACKAGE = ("torch", "transformers", "huggingface_hub", "steps", "agnews", "tests", "boto3", "sympy", "google")


def pins(path: Path) -> dict[str, str]:
    lines = [line.strip() for line in path.read_text().splitlines()]
    return dict(line.split("==") for line in lines if line and not line.startswith("#"))


def test_requirements_pin_the_runtime_wheels_and_the_project_tokenizer() -> None:
    lambda_pins = pins(LAMBDA_DIR / "requirements.txt")
    assert set(lambda_pins) == {"numpy", "onnxruntime", "snapshot-restore-py", "tokenizers"}
    # tokenizer.json is written by the project's tokenizers, and the bundle by its onnxruntime: the Lambda reads
    # them with the same releases
    project = pins(PROJECT_ROOT / "requirements.txt")
    for name in ("tokenizers", "onnxruntime"):
        assert lambda_pins[name] == project[name] == version(name)
    dev = pins(PROJECT_ROOT / "requirements-dev.txt")
    # the SnapStart hooks' registry, the same release here as in the zip
    assert lambda_pins["snapshot-restore-py"] == dev["snapshot-restore-py"] == version("snapshot-restore-py")


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
    # signed requests unless asked otherwise, and what a public URL exposes said where `sam deploy --guided` shows it
    auth = template["Parameters"]["UrlAuthType"]
    assert auth["Default"] == "AWS_IAM"
    assert "NONE makes the Function URL public" in auth["Description"]
    assert "With NONE the URL is public" in template["Description"]
    # reserved concurrency, a parameter: -1 leaves it out of the function
    reserved = template["Parameters"]["ReservedConcurrency"]
    assert (reserved["Type"], reserved["Default"], reserved["MinValue"]) == ("Number", 10, -1)
    assert function["ReservedConcurrentExecutions"] == {
        "Fn::If": ["ReservesConcurrency", {"Ref": "ReservedConcurrency"}, {"Ref": "AWS::NoValue"}]
    }
    assert template["Conditions"]["ReservesConcurrency"] == {
        "Fn::Not": [{"Fn::Equals": [{"Ref": "ReservedConcurrency"}, -1]}]
    }
    # SnapStart, off unless asked for, on the published versions that every deploy makes
    snapstart = template["Parameters"]["SnapStart"]
    assert (snapstart["Default"], snapstart["AllowedValues"]) == ("None", ["None", "PublishedVersions"])
    assert function["SnapStart"] == {"ApplyOn": {"Ref": "SnapStart"}}
    assert function["AutoPublishAlias"] == "live"


def copied(dockerfile: str) -> dict[str, str]:
    """What the Dockerfile's COPY lines take from the context: {path in the context: path below LAMBDA_TASK_ROOT}."""
    files = {}
    for line in dockerfile.splitlines():
        if line.startswith("COPY "):
            *sources, target = line.split()[1:]
            folder = target.removeprefix("${LAMBDA_TASK_ROOT}/")
            files |= {source: folder + Path(source).name for source in sources}
    return files


def test_container_file_copies_the_zips_code_from_the_project_root() -> None:
    dockerfile = (LAMBDA_DIR / "Dockerfile").read_text()
    assert f"FROM public.ecr.aws/lambda/python:{lambda_python()}\n" in dockerfile
    assert "#   docker build -f lambda/Dockerfile -t agnews-lambda .\n" in dockerfile
    assert copied(dockerfile) == {"lambda/requirements.txt": "requirements.txt"} | CODE
    assert all((PROJECT_ROOT / source).is_file() for source in copied(dockerfile))
    assert 'CMD ["handler.lambda_handler"]' in dockerfile
    # it runs as a user that is not root, and the example publishes the emulator on the loopback address only
    users = [line.split()[1] for line in dockerfile.splitlines() if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    lines = dockerfile.splitlines()
    assert max(i for i, line in enumerate(lines) if line.startswith("USER ")) > max(
        i for i, line in enumerate(lines) if line.startswith(("COPY ", "RUN "))
    )
    assert "#   docker run -p 127.0.0.1:9000:8080 " in dockerfile


def test_container_context_holds_only_what_the_image_copies() -> None:
    """lambda/Dockerfile.dockerignore, which BuildKit reads in place of the root's, as docker-py applies it."""
    lines = (LAMBDA_DIR / "Dockerfile.dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    context = {
        path
        for path in exclude_paths(str(PROJECT_ROOT), patterns, "lambda/Dockerfile")
        if (PROJECT_ROOT / path).is_file()
    }
    copies = copied((LAMBDA_DIR / "Dockerfile").read_text())
    assert context - {".dockerignore", "lambda/Dockerfile"} == set(copies)


def glibc_needed(platform: str) -> tuple[int, int]:
    """The glibc version that a manylinux x86_64 platform tag requires (none for a pure-Python wheel)."""
    if platform == "any":
        return (0, 0)
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
        shipped = {source: archive.read(packaged) for source, packaged in CODE.items()}
    assert unzipped <= ZIP_LIMIT
    assert f"{unzipped / 2**20:.1f} MiB unzipped (AWS limit 250 MiB)" in lambda_package.make_output
    assert shipped == {source: (PROJECT_ROOT / source).read_bytes() for source in CODE}
    top_level = {name for name in names if name.endswith(".py") and "/" not in name}
    assert top_level - set(CODE.values()) == {"snapshot_restore_py.py"}  # the wheel's module
    # bytecode for the runtime's Python, valid whatever mtimes the unzip gives (PEP 552 flags: hash-based, unchecked)
    tag = f"cpython-{target.replace('.', '')}"
    pycs = {name for name in names if name.endswith(".pyc")}
    code = [Path(name) for name in CODE.values()]
    assert {(path.parent / "__pycache__" / f"{path.stem}.{tag}.pyc").as_posix() for path in code} <= pycs
    assert "numpy/__pycache__/__init__." + tag + ".pyc" in pycs
    with zipfile.ZipFile(lambda_package.zip) as archive:
        assert {int.from_bytes(archive.read(name)[4:8], "little") for name in pycs} == {0b01}
    assert {n.split("/")[0] for n in names}.isdisjoint(NOT_IN_PACKAGE)
    # what the wheels carry but the handler never imports or loads is left out (the unpacked zip answers: below)
    assert not [name for name in names if UNUSED.match(name)]
    assert len(tags) >= len(pins(LAMBDA_DIR / "requirements.txt"))
    for tag in tags:
        python, abi, platform = tag.split("-")
        assert python == "cp" + target.replace(".", "") or abi == "abi3" or (python, abi) == ("py3", "none"), tag
        assert glibc_needed(platform) <= RUNTIME_GLIBC, tag


def test_unpacked_zip_alone_answers_as_the_handler_does(
    lambda_package: LambdaPackage, mirror_root: Path, serve, tmp_path: Path
) -> None:
    """The shipped wheels, on the runtime's Python, run the bundle that the project wrote, and agree."""
    (packaged,) = invoke_packaged(lambda_package.folder, mirror_root, tmp_path / "cache", [{"text": SEED_TEXT}])
    assert packaged["statusCode"] == 200
    assert packaged["body"]["model_version"] == 1
    here = serve(mirror_root)({"text": SEED_TEXT})["body"]
    assert packaged["body"]["predicted_class"] == here["predicted_class"]
    assert packaged["body"]["probabilities"] == pytest.approx(here["probabilities"], abs=1e-3)
