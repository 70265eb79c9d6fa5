# The image that MLproject's docker_env names: `docker build -t agnews-mlops .` (or `docker compose build`).
# It holds the code as built: `mlflow run .` runs what was copied in here, so rebuild after a change
# (the code is the last layer, so a rebuild takes seconds).
#
# The CUDA variant is the same file with two build args, a CUDA base image and PyTorch's CUDA wheel index:
#   docker build -t agnews-mlops --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
# and runs with the GPUs passed in: `mlflow run . -e main -A gpus=all ...` (docs/docker.md, "GPU").
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# Where torch comes from: PyPI's torch is a multi-GB CUDA build, so the CPU index by default; a CUDA index
# (https://download.pytorch.org/whl/cu128, ...) for the CUDA variant. It must hold the torch version that
# requirements.txt pins. Empty for an offline build that finds torch in container/wheels instead.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A venv, so the same steps work on python:3.11-slim and on a Debian or Ubuntu base with only `python3`. A base
# without Python or its venv module (the CUDA images are plain Ubuntu) gets them from apt first; on
# python:3.11-slim the first `venv` succeeds and apt is never called.
# hadolint ignore=DL3008
RUN python3 -m venv /opt/venv 2>/dev/null \
    || { rm -rf /opt/venv \
        && apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            python3 python3-venv ca-certificates \
        && rm -rf /var/lib/apt/lists/* \
        && python3 -m venv /opt/venv; }

# The pinned list from requirements.txt; wheels in container/wheels come first.
RUN --mount=type=bind,source=requirements.txt,target=/tmp/build/requirements.txt \
    --mount=type=bind,source=container/wheels,target=/tmp/build/wheels \
    --mount=type=cache,target=/root/.cache/pip \
    pip install --find-links /tmp/build/wheels ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} \
        -r /tmp/build/requirements.txt

# The predict step's Spark engine (predict.engine=spark): `--build-arg SPARK=true` adds pyspark, the extra `spark`
# (requirements-spark.txt), and the Java runtime it runs on (the distribution's default JRE: 17 or 21).
ARG SPARK=false
# hadolint ignore=DL3008
RUN --mount=type=bind,source=requirements-spark.txt,target=/tmp/build/requirements-spark.txt \
    --mount=type=cache,target=/root/.cache/pip \
    if [ "$SPARK" = true ]; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends default-jre-headless \
        && rm -rf /var/lib/apt/lists/* \
        && pip install -r /tmp/build/requirements-spark.txt; \
    fi

# uid 1000 is `ubuntu` in the Ubuntu 24.04 images (the CUDA base): that account goes, so that `app` gets it.
RUN if id -u ubuntu >/dev/null 2>&1; then userdel ubuntu && rm -rf /home/ubuntu; fi \
    && useradd --create-home --uid 1000 app \
    && mkdir -p /app/.store /app/.checkpoints \
    && chown app:app /app /app/.store /app/.checkpoints
COPY container/entrypoint.sh /usr/local/bin/entrypoint
WORKDIR /app
COPY MLproject ./
COPY conf/ conf/
COPY bundle/ bundle/
COPY agnews/ agnews/
COPY steps/ steps/

# MLflow imports GitPython, and the image has no git: no warning about it on every run.
ENV GIT_PYTHON_REFRESH=quiet
USER 1000:1000
ENTRYPOINT ["entrypoint"]
CMD ["python", "-m", "steps.main"]
