"""The names that steps share: run tags, metric names, artifact names and version tags.

``train``, ``register``, ``mirror``, ``tune``, ``monitor`` and the benchmarks read and write these; no other module
spells them as literals (tests/code/test_names.py checks).
"""

from __future__ import annotations

from typing import Literal

# Metrics that the train step logs and register, mirror and the benchmarks read.
TEST_ACCURACY = "test_accuracy"
TEST_F1_MACRO = "test_f1_macro"
ONNX_INT8_ACCURACY = "onnx_int8_accuracy"
ONNX_INT8_AGREEMENT = "onnx_int8_agreement"
BEHAVIOUR_PASS_RATE = "behaviour_pass_rate"  # the pyfunc's behavioural checks
ONNX_INT8_BEHAVIOUR_PASS_RATE = "onnx_int8_behaviour_pass_rate"  # the int8 bundle's

# Run tags that the train step writes and register copies onto the model version.
STEP_TAG = "step"  # which step a run is: upload, train, register, mirror, ...
GIT_COMMIT_TAG = "git_commit"
DATASET_TAG_PREFIX = "dataset."  # every dataset.* run tag is copied onto the version
TRAIN_SHA256_TAG = "dataset.train.sha256"
TEST_SHA256_TAG = "dataset.test.sha256"  # the test file's sha256
TEST_ROWS_COUNT_TAG = "dataset.test.rows"  # how many of its rows were scored
TEST_ROWS_TAG = "dataset.test.rows_sha256"  # which rows were scored (agnews.data.rows_sha256 of their line numbers)
DISPLAY_NAME_PARAM = "model.display_name"

# The registered model's aliases (MLflow 3; stages are deprecated): @champion is served, @previous the champion it
# replaced, @challenger the newest version that failed the quality gate.
CHAMPION, PREVIOUS, CHALLENGER = "champion", "previous", "challenger"

# Model version tags that register writes.
PROMOTED_BY = "promoted_by"  # how the version became @champion: BY_GATE or BY_HAND
BY_GATE, BY_HAND = "gate", "manual"
GATE_TAG = "gate"  # the gate's verdict at registration
SOURCE_RUN_TAG = "run_id"  # the train run the version was registered from
RECORDED_CHAMPION = "recorded_champion"  # registered model tag: the champion as the pipeline last saw it
MODEL_VERSIONS_TAG = "mlflow.modelVersions"  # a logged model's registered versions, as the MLflow UI reads them

# Run tags that register (and main's parent run) write: where the call left the model.
REGISTERED_MODEL, REGISTERED_VERSION = "registered_model", "registered_version"
REGISTERED_ALIAS, REGISTERED_REASON = "registered_alias", "registered_reason"

# Run tags that mirror (and a register that promotes) write.
MIRROR_VERSION, MIRROR_POINTER, MIRROR_CHANGED = "mirror.version", "mirror.pointer", "mirror.changed"
MIRROR_FOLDER, MIRROR_HOW, MIRROR_VIA, MIRROR_RECORDED = "mirror.folder", "mirror.how", "mirror.via", "mirror.recorded"

# How @champion came to name a version: the gate, registry.version, registry.rollback, or a move outside the
# project's steps (the MLflow UI, or its REST API).
How = Literal["gate", "manual", "rollback", "ui"]
# How storage learned of it: a webhook delivery, the receiver's timer, a register, or a mirror.
Via = Literal["delivery", "timer", "register", "mirror"]

# The webhook's secret, shared by `steps.webhook serve` and `register`, and the tracking server's key for the
# secrets it stores.
WEBHOOK_SECRET_ENV = "AGNEWS_WEBHOOK_SECRET"
WEBHOOK_KEY_ENV = "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY"

# The reference profile: the model's own answers on the validation split, which the train step logs as this run
# artifact and the mirror copies beside the bundle; `monitor` compares the captured answers with it.
REFERENCE_ARTIFACT = "reference/reference.parquet"

# What `monitor` tags on its run and on each version it judged, and its verdicts.
MONITOR_VERDICT_TAG = "monitor.verdict"
OK, DRIFT, TOO_FEW, NO_REFERENCE = "ok", "drift", "too few answers", "no reference"
