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
# replaced, @challenger the newest version that failed the quality gate, @candidate a version meeting live traffic
# beside @champion (a rollout: steps.rollout).
CHAMPION, PREVIOUS, CHALLENGER, CANDIDATE = "champion", "previous", "challenger", "candidate"

# Model version tags that register writes.
PROMOTED_BY = "promoted_by"  # how the version became @champion: BY_GATE, BY_HAND or BY_ROLLOUT
BY_GATE, BY_HAND, BY_ROLLOUT = "gate", "manual", "rollout"
# A rollout's candidate: its mode (shadow or canary), its canary weight and the rollout's id, which the receiver's
# reconcile reads to put @candidate into champion.json.
ROLLOUT_MODE_TAG, ROLLOUT_WEIGHT_TAG, ROLLOUT_ID_TAG = "rollout.mode", "rollout.weight", "rollout.id"
ROLLOUT_ACTION_TAG = "rollout.action"  # the rollout step's run: start, promote or abort
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
MIRROR_CANDIDATE = "mirror.candidate"  # the rollout's candidate that champion.json serves beside the champion

# How @champion came to name a version: the gate, registry.version, registry.rollback, or a move outside the
# project's steps (the MLflow UI, or its REST API); and a rollout's steps: a candidate started in shadow or canary
# mode, promoted to @champion, or aborted.
How = Literal["gate", "manual", "rollback", "ui", "shadow", "canary", "promote", "abort"]
# How storage learned of it: a webhook delivery, the receiver's timer, a register, a mirror, a rollout step, or the
# monitor acting on its rollout verdict.
Via = Literal["delivery", "timer", "register", "mirror", "rollout", "monitor"]

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
# What `monitor` says of a rollout under way, on its run and on the candidate's version: the verdict, why, and what
# it did with it (monitor.rollout.act); its verdicts; and the prefix of the comparison's metrics on its run.
ROLLOUT_VERDICT_TAG, ROLLOUT_WHY_TAG = "monitor.rollout.verdict", "monitor.rollout.why"
ROLLOUT_ACTED_TAG = "monitor.rollout.acted"
PROMOTE, ABORT, WAIT = "promote", "abort", "wait"
ROLLOUT_METRIC_PREFIX = "rollout."

# Metrics that the train step logs beside the test metrics, and tune and the benchmarks read.
BEST_VAL_ACCURACY = "best_val_accuracy"  # the kept checkpoint's validation accuracy (a study's objective)
TRAIN_ROWS, VAL_ROWS, TEST_ROWS = "train_rows", "val_rows", "test_rows"
PEAK_RSS_MB = "peak_rss_mb"
# The training figures: the Trainer's samples/s (which includes the per-epoch evaluation and checkpoint saves), the
# training loop's alone, and the wall time of trainer.train().
TRAIN_SAMPLES_PER_SECOND = "train_samples_per_second"
TRAIN_LOOP_SAMPLES_PER_SECOND = "train_loop_samples_per_second"
TRAIN_WALL_TIME_S = "train_wall_time_s"
TRAIN_FIGURES = (TRAIN_SAMPLES_PER_SECOND, TRAIN_LOOP_SAMPLES_PER_SECOND, TRAIN_WALL_TIME_S)
# The behavioural checks' metric prefixes (<prefix>_pass_rate, <prefix>_<kind>_pass_rate): the pyfunc's and the int8
# bundle's.
BEHAVIOUR, ONNX_INT8_BEHAVIOUR = "behaviour", "onnx_int8_behaviour"

# Run tags that the train step writes.
BEST_CHECKPOINT_TAG = "best_checkpoint"  # the checkpoint folder that validation kept
PRECISION_TAG, DEVICE_TAG = "precision", "device"  # what train.precision resolved to, on which card or CPU
RESUMED_FROM_CHECKPOINT_TAG, RESUMED_FROM_RUN_TAG = "resumed_from_checkpoint", "resumed_from_run"
SPLIT_SHA256_TAGS = {"train": TRAIN_SHA256_TAG, "test": TEST_SHA256_TAG}  # each split file's sha256, by split

# Artifacts of a train run.
CONFUSION_MATRIX_ARTIFACT = "confusion_matrix.png"
CLASSIFICATION_REPORT_ARTIFACT = "classification_report.json"
MISCLASSIFIED_ARTIFACT = "misclassified.json"
BEHAVIOUR_FAILURES_ARTIFACT = "behaviour_failures.json"
# Every step's run: its composed config.
CONFIG_ARTIFACT = "config.yaml"

# Run tags that every step's run carries (agnews.tracking.step_run): the process it ran in, which cleanup reads to
# tell a run whose process is gone (a pid the system has given to a new process has another start time).
HOST_TAG, PID_TAG, STARTED_TAG = "process.host", "process.pid", "process.started"
ERROR_TAG = "error"  # a failed step's run, and main's parent run: the step's one-line error
# main's parent run: each step's run id (child.<step>) and the step that failed.
CHILD_TAG_PREFIX, FAILED_STEP_TAG = "child.", "failed_step"
DATASET_CHANGED_TAG = "dataset.changed"  # upload: whether it wrote a new dataset
CLOSED_TAG = "closed_as_stale"  # cleanup: why it closed a run as KILLED

# tune: the study's and its trials' links to their MLflow runs (Optuna user attributes), and the trial runs' tags.
STUDY_PARENT_ATTR, TRIAL_RUN_ATTR = "mlflow_parent_run_id", "mlflow_run_id"
TRIAL_STATE_TAG, TRIAL_NUMBER_TAG = "trial.state", "trial.number"  # Optuna's state: COMPLETE, PRUNED or FAIL
STUDY_TAG, STUDY_STORAGE_TAG, BEST_TRIAL_TAG = "tune.study", "tune.storage", "tune.best_trial"
STUDY_PARENT_TAG = "tune.parent_run_id"  # a joining worker's own run under `mlflow run`: the study's parent run
SEARCH_SPACE_ARTIFACT, BEST_PARAMS_ARTIFACT = "search_space.json", "best_params.json"
