#!/usr/bin/env bash
# Every CUDA path of resnet_lab once, in under 5 minutes on one H100/H200, into one log (issue 15).
#
#   benchmarks/gpu_smoke.sh [--cpu] [--log FILE] [--only STEP,...] [--tracking-uri URI]
#
# Steps: the CUDA tests; resnet-20 on synthetic data for 200 iterations with probes, killed
# (SIGKILL) after its first checkpoint, refused on the CPU (a CUDA checkpoint never resumes in
# another precision), then resumed on CUDA into one FINISHED run; 35 training steps under
# torch.cuda.set_sync_debug_mode("error") (no host sync in the step); a 2-run study with
# --devices 0 --jobs 2; throughput.py --quick --compile and probe_overhead.py on short
# settings; resnet-20 and plain-20 on real Fashion-MNIST for 2,000 iterations (images/s, final
# test error; FASHION_MNIST_DIR, else /usr/share/datasets/fashion-mnist, else skipped).
#
# --cpu: the same steps on the CPU on tiny settings (the CUDA-only checks are skipped), so the
# script can be run, and tested, where there is no GPU (the whole walk takes minutes on 2 shared
# cores; tests/test_gpu_smoke.py runs the steps no other test covers). --only runs the named
# steps (ids: environment tests kill refuse resume sync study bench fashion); environment always runs.
# --tracking-uri: an existing MLflow store to use (default: a new one in a temporary folder).
# Exit status: 0 when no step failed (skipped steps are listed), 1 otherwise; 2 for a bad option.
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset MLFLOW_TRACKING_URI

CPU=0
LOG=""
ONLY=""
URI=""
STEPS=" environment tests kill refuse resume sync study bench fashion "
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu) CPU=1 ;;
        --log) LOG=${2:?--log needs a file}; shift ;;
        --only) ONLY=" ${2//,/ } "; shift ;;
        --tracking-uri) URI=${2:?--tracking-uri needs a URI}; shift ;;
        *) echo "gpu_smoke.sh: unknown option $1 (use --cpu, --log FILE, --only STEP,..., --tracking-uri URI)" >&2
           exit 2 ;;
    esac
    shift
done
for id in $ONLY; do
    [[ $STEPS == *" $id "* ]] || { echo "gpu_smoke.sh: unknown step $id (steps:$STEPS)" >&2; exit 2; }
done
if [ "$CPU" = 1 ]; then
    DEV=cpu MODEL=8 ITERS=20 LOG_EVERY=5 CKPT_EVERY=10 BATCH=32 STUDY_ITERS=10 FASHION_ITERS=10
else
    DEV=cuda MODEL=20 ITERS=200 LOG_EVERY=10 CKPT_EVERY=50 BATCH=128 STUDY_ITERS=200 FASHION_ITERS=2000
fi
LOG=${LOG:-benchmarks/results/$DEV-smoke-$(date +%Y-%m-%d-%H%M%S).log}
mkdir -p "$(dirname "$LOG")" && : >"$LOG"
LOG=$(cd "$(dirname "$LOG")" && pwd)/$(basename "$LOG")
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
URI=${URI:-sqlite:///$WORK/mlflow.db}
FAILED=0
SUMMARY=()

say() { echo "$*" | tee -a "$LOG"; }

# step ID NAME COMMAND...: run it with its output in the log; "ok", "FAIL" or (exit 77) "skip".
step() {
    local id=$1 name=$2 t0=$SECONDS rc
    shift 2
    if [ -n "$ONLY" ] && [ "$id" != environment ] && [[ $ONLY != *" $id "* ]]; then return; fi
    echo "=== $name" >>"$LOG"
    "$@" >>"$LOG" 2>&1
    rc=$?
    local took=$((SECONDS - t0))s
    if [ $rc = 0 ]; then SUMMARY+=("ok    $took  $name")
    elif [ $rc = 77 ]; then SUMMARY+=("skip  $took  $name")
    else SUMMARY+=("FAIL  $took  $name (exit $rc)"); FAILED=1; fi
    say "${SUMMARY[-1]}"
}

lab() { "$PY" -m resnet_lab "$@"; }

environment() {
    date -u +"%Y-%m-%dT%H:%M:%SZ"
    git log -1 --format="commit %H%n%s" 2>/dev/null
    command -v nvidia-smi >/dev/null && nvidia-smi -L
    "$PY" - "$DEV" <<'EOF'
import sys, torch
print("ENV torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
if sys.argv[1] == "cuda":
    print("ENV device", torch.cuda.get_device_name(0), "count", torch.cuda.device_count())
    sys.exit(0 if torch.cuda.is_available() else 1)
EOF
}

cuda_tests() {
    [ "$CPU" = 1 ] && { echo "skipped: --cpu (the suite itself runs these)"; return 77; }
    "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_data.py tests/test_train.py tests/test_gpu_paths.py \
        -k "cuda or test_gpu_paths"
}

TRAIN_ARGS=(--model "resnet-$MODEL" --dataset synthetic --iterations "$ITERS" --no-progress --tracking-uri "$URI"
            --experiment smoke-resume --set "log_every=$LOG_EVERY" --set "eval_every=$((ITERS / 2))"
            --set "batch_size=$BATCH" --set "checkpoint_every=$CKPT_EVERY" --set "checkpoint_dir=$WORK/ckpt")

kill_after_first_checkpoint() {
    "$PY" -m resnet_lab train "${TRAIN_ARGS[@]}" --device "$DEV" &  # not via lab(): $! must be python itself
    local pid=$! waited=0
    until compgen -G "$WORK/ckpt/smoke-resume/*.pt" >/dev/null; do
        kill -0 $pid 2>/dev/null || { echo "train ended before its first checkpoint"; return 1; }
        sleep 0.05
        waited=$((waited + 1))
        [ $waited -gt 4000 ] && { kill -9 $pid; echo "no checkpoint within 200 s"; return 1; }
    done
    kill -9 $pid
    wait $pid
    echo "killed with SIGKILL (exit $?) after the checkpoint $(ls "$WORK"/ckpt/smoke-resume/)"
}

refused_on_cpu() {
    [ "$CPU" = 1 ] && { echo "skipped: --cpu (no CUDA checkpoint to refuse)"; return 77; }
    local out rc
    out=$(lab train "${TRAIN_ARGS[@]}" --device cpu 2>&1)
    rc=$?
    echo "$out"
    [ $rc = 2 ] && grep -q "was written on cuda in bf16, this run is on cpu in fp32" <<<"$out"
}

resume_to_one_finished_run() {
    lab train "${TRAIN_ARGS[@]}" --device "$DEV" || return 1
    "$PY" benchmarks/smoke_checks.py resumed "$URI" "$ITERS" "$LOG_EVERY"
}

no_sync_in_the_step() {
    "$PY" benchmarks/smoke_checks.py no-sync "$DEV" "$MODEL"
}

two_run_study() {
    cat >"$WORK/smoke.toml" <<EOF
name = "smoke-study"
depths = [$MODEL]
[train]
dataset = "synthetic"
iterations = $STUDY_ITERS
log_every = $((STUDY_ITERS / 2))
eval_every = $STUDY_ITERS
batch_size = $BATCH
checkpoint_every = 0
[cpu]
EOF
    local where=(--jobs 2)
    [ "$CPU" = 0 ] && where=(--devices 0 --jobs 2)  # the --devices path: CUDA_VISIBLE_DEVICES per worker
    local out
    out=$(lab study "$WORK/smoke.toml" --scale full "${where[@]}" --no-progress --tracking-uri "$URI" 2>&1) || {
        echo "$out"; return 1; }
    echo "$out"
    grep -q "2 runs, 2 trained" <<<"$out"
}

benchmarks() {
    if [ "$CPU" = 1 ]; then
        (cd benchmarks && "$PY" throughput.py --device cpu --quick --models resnet-8 --ref-workers 0 --windows 1 \
            --steps 1 --warmup 1 --images 512) || return 1
        (cd benchmarks && "$PY" probe_overhead.py --device cpu --models resnet-8 --rounds 1 --window 1 --warmup 1 \
            --flow-reps 1) || return 1
        (cd benchmarks && "$PY" fused_speed.py --device cpu --quick)
    else
        (cd benchmarks && "$PY" throughput.py --device cuda --quick --compile) || return 1
        (cd benchmarks && "$PY" probe_overhead.py --device cuda --models resnet-20 --rounds 5 --window 10 \
            --warmup 2 --flow-reps 3) || return 1
        # fused vs unfused images/s and the projected paper-study time; bf16 as the lab trains on CUDA
        (cd benchmarks && "$PY" fused_speed.py --device cuda --precision bf16)
    fi
}

fashion_mnist() {
    local dir=${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}
    compgen -G "$dir/train-images-idx3-ubyte*" >/dev/null || {
        echo "skipped: no Fashion-MNIST in $dir (set FASHION_MNIST_DIR)"; return 77; }
    for arch in resnet plain; do
        lab train --model "$arch-$MODEL" --dataset fashion-mnist --data-dir "$dir" --iterations "$FASHION_ITERS" \
            --device "$DEV" --no-progress --tracking-uri "$URI" --experiment smoke-fashion \
            --set "log_every=$((FASHION_ITERS / 10))" --set "eval_every=$FASHION_ITERS" --set checkpoint_every=0 \
            --set "batch_size=$BATCH" || return 1
    done
    "$PY" benchmarks/smoke_checks.py fashion "$URI"
}

say "resnet_lab smoke ($DEV), log $LOG"
step environment "environment" environment
step tests "CUDA tests" cuda_tests
step kill "resnet-$MODEL synthetic $ITERS it: SIGKILL after the first checkpoint" kill_after_first_checkpoint
step refuse "the CUDA checkpoint is refused on the CPU" refused_on_cpu
step resume "resumed into one FINISHED run" resume_to_one_finished_run
step sync "35 steps without a host sync" no_sync_in_the_step
step study "2-run study, --jobs 2" two_run_study
step bench "benchmarks: throughput, probe overhead, fused vs unfused" benchmarks
step fashion "Fashion-MNIST resnet-$MODEL and plain-$MODEL, $FASHION_ITERS it" fashion_mnist
RESULTS=$(grep -E "^(ENV|RESULT) " "$LOG")
echo "--- summary" >>"$LOG"
[ -n "$RESULTS" ] && say "$RESULTS"
printf '%s\n' "${SUMMARY[@]}" >>"$LOG"
say "$([ $FAILED = 0 ] && echo "smoke passed" || echo "smoke FAILED")"
exit $FAILED
