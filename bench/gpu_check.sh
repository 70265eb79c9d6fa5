#!/usr/bin/env bash
# The GPU check: on a bare CUDA machine, in under 7 minutes (BUDGET), every step bounded by `timeout`, it trains
# through the train step itself (python -m steps.train) and writes bench/results/gpu.json (bench/gpu_report.py):
#   env        the card, driver, CUDA, torch and transformers versions, and what train.precision=auto resolves to
#   upload     AG News (AGNEWS_DIR) into a local store under WORK, MLflow on SQLite beside it
#   seed       train=seed_recipe  } a full-size DistilBERT architecture with random init (DIMS), the same SAMPLE
#   ours       the default recipe } training rows, 1 epoch: training-loop samples/s of each (ours at auto)
#   ours_fp32  ours in plain fp32 (train.precision=fp32 train.tf32=false), against ours at auto
#   full       ours on the whole train split (FULL_SAMPLE=0; data.val_size of it validates), EPOCHS epochs: training-
#              loop seconds, test accuracy, the pyfunc and int8 bundle logged or not, onnx_int8_agreement
#   then, while time is left, diagnostics: ours_no_pad (auto without padding to a multiple of 8) and ours_tf32
#   (fp32 with TF32 matmuls).
#
#   bench/gpu_check.sh              # from anywhere; on the GPU machine
#   make gpu-check-rehearsal        # the same script on this CPU with tiny settings (build/gpu-rehearsal/)
#
# Settings, from the environment: PY (a Python with CUDA torch; default .venv/bin/python, else python3), WHEELS (a
# folder of wheels for what that Python lacks, installed under WORK first: bench/gpu_wheels.sh), AGNEWS_DIR, WORK,
# RESULT, BUDGET (seconds for the whole script), SAMPLE, TEST_ROWS, DIMS (dim,hidden_dim,layers,heads), LR,
# FULL_SAMPLE, EPOCHS, EXTRA (Hydra overrides for every train run, e.g. "train.batch_size=64"), TOKENIZER, STEPS
# (the train steps to run, e.g. STEPS=full; env and upload always run). DRY_RUN=1 prints each command, runs none.
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 1
if [[ -z ${PY:-} ]]; then [[ -x .venv/bin/python ]] && PY=$ROOT/.venv/bin/python || PY=python3; fi
AGNEWS_DIR=${AGNEWS_DIR:-$(dirname "$ROOT")/shared/data/ag_news}
WORK=${WORK:-${TMPDIR:-/tmp}/agnews-gpu-check}
RESULT=${RESULT:-$ROOT/bench/results/gpu.json}
BUDGET=${BUDGET:-400}
SAMPLE=${SAMPLE:-4000}
TEST_ROWS=${TEST_ROWS:-1000}
DIMS=${DIMS:-768,3072,6,12}
LR=${LR:-5e-5}
FULL_SAMPLE=${FULL_SAMPLE:-0}
EPOCHS=${EPOCHS:-3}
EXTRA=${EXTRA:-}
TOKENIZER=${TOKENIZER:-}
STEPS=${STEPS:-seed ours ours_fp32 full ours_no_pad ours_tf32}
RESERVE=15   # seconds kept back for the report
export BUDGET SAMPLE TEST_ROWS DIMS LR FULL_SAMPLE EPOCHS EXTRA STEPS AGNEWS_DIR   # the report records them
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HYDRA_FULL_ERROR=1 MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}

T0=$(date +%s)
left() { echo $((BUDGET - ($(date +%s) - T0))); }
say() { echo "=== [+$(($(date +%s) - T0))s, $(left)s left] $*"; }
# limit CAP: CAP seconds, or what the budget leaves after the reserve if that is less
limit() { local l=$(($(left) - RESERVE)); echo $((l < $1 ? l : $1)); }
record() { printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$WORK/steps.tsv"; }

# a fresh start: only what an earlier check left in WORK is removed
rm -rf "$WORK"/{logs,smi,store,checkpoints,site,artifacts,mlflow.db,steps.tsv,env.json}
mkdir -p "$WORK/logs" "$WORK/smi" || exit 1

if [[ -n ${WHEELS:-} ]]; then
    say "wheels from $WHEELS into $WORK/site"
    timeout -k 5 "$(limit 60)" "$PY" -m pip install --quiet --no-index --no-deps --target "$WORK/site" "$WHEELS"/*.whl \
        || { echo "FATAL: the wheels did not install"; exit 1; }
    export PYTHONPATH=$PYTHONPATH:$WORK/site
fi

# step LABEL CAP COMMAND...: run it under `timeout`, its output in WORK/logs/LABEL.log, GPU use sampled beside it
step() {
    local label=$1 cap=$2 t smi='' rc began wall
    shift 2
    t=$(limit "$cap")
    if ((t < 20)); then
        say "$label: skipped, ${t}s left"
        record "$label" "" "" "" "skipped: ${t}s left in the budget" "${*:2}"
        return 1
    fi
    say "$label (limit ${t}s): ${*:2}"
    [[ -n ${DRY_RUN:-} ]] && return 0
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader,nounits -lms 500 --id=0 \
            >"$WORK/smi/$label.csv" 2>/dev/null &
        smi=$!
    fi
    began=$(date +%s%N)
    timeout -k 10 "$t" "$@" >"$WORK/logs/$label.log" 2>&1
    rc=$?
    wall=$((($(date +%s%N) - began) / 1000000))
    [[ -n $smi ]] && kill "$smi" 2>/dev/null
    wall=$((wall / 1000)).$(printf %03d $((wall % 1000)))
    record "$label" "$rc" "$wall" "$t" "" "${*:2}"
    say "$label: exit $rc after ${wall}s"
    ((rc == 0)) || tail -n 5 "$WORK/logs/$label.log"
    return $rc
}

IFS=, read -r DIM HIDDEN LAYERS HEADS <<<"$DIMS"
STORE=(storage.uri="$WORK/store" tracking.uri="sqlite:///$WORK/mlflow.db")
MODEL=(model=tiny model.init.dim="$DIM" model.init.hidden_dim="$HIDDEN" model.init.n_layers="$LAYERS"
    model.init.n_heads="$HEADS" train.learning_rate="$LR" ${TOKENIZER:+model.tokenizer="$TOKENIZER"})
# train LABEL CAP OVERRIDES...: the train step, into an experiment of its own (gpu-LABEL)
train() {
    local label=$1 cap=$2
    shift 2
    [[ " $STEPS " == *" $label "* ]] || return 0
    # shellcheck disable=SC2086  # EXTRA holds several overrides
    step "$label" "$cap" "$PY" -m steps.train "${STORE[@]}" "${MODEL[@]}" tracking.experiment="gpu-$label" \
        train.output_dir="$WORK/checkpoints/$label" "$@" $EXTRA
    local rc=$?
    rm -rf "$WORK/checkpoints/$label"
    return $rc
}

step env 60 "$PY" bench/gpu_report.py env "$WORK/env.json" && [[ -f $WORK/env.json ]] && cat "$WORK/env.json"
step upload 90 "$PY" -m steps.upload "${STORE[@]}" data.source="$AGNEWS_DIR" \
    || { say "FATAL: no dataset, nothing to train on"; "$PY" bench/gpu_report.py summary "$WORK" "$RESULT"; exit 1; }
SAME=(data.sample_size="$SAMPLE" data.test_size="$TEST_ROWS" train.epochs=1)
train seed 150 train=seed_recipe "${SAME[@]}"
train ours 100 "${SAME[@]}"
train ours_fp32 100 "${SAME[@]}" train.precision=fp32 train.tf32=false
train full 100000 data.sample_size="$FULL_SAMPLE" data.test_size=null train.epochs="$EPOCHS"
train ours_no_pad 100 "${SAME[@]}" train.pad_to_multiple_of=null
train ours_tf32 100 "${SAME[@]}" train.precision=fp32 train.tf32=true

[[ -n ${DRY_RUN:-} ]] && exit 0
say "report: $RESULT"
"$PY" bench/gpu_report.py summary "$WORK" "$RESULT"
rc=$?
say "done"
exit $rc
