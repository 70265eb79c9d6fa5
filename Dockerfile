# The image that MLproject's docker_env names: `docker build -t agnews-mlops .` (or `docker compose build`).
# It holds the code as built: `mlflow run .` runs what was copied in here, so rebuild after a change
# (the code is the last layer, so a rebuild takes seconds).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# Where torch comes from: PyPI's torch is a multi-GB CUDA build, so the CPU index by default.
# Empty for an offline build that finds torch in container/wheels instead.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# A venv, so the same steps work on python:3.11-slim and on a Debian base with only `python3`.
RUN python3 -m venv /opt/venv

# The pinned list from requirements.txt; wheels in container/wheels come first.
RUN --mount=type=bind,source=requirements.txt,target=/tmp/build/requirements.txt \
    --mount=type=bind,source=container/wheels,target=/tmp/build/wheels \
    --mount=type=cache,target=/root/.cache/pip \
    pip install --find-links /tmp/build/wheels ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} \
        -r /tmp/build/requirements.txt

RUN useradd --create-home --uid 1000 app \
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
USER app
ENTRYPOINT ["entrypoint"]
CMD ["python", "-m", "steps.main"]
