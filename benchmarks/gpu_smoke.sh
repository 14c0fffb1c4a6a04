#!/usr/bin/env bash
# Every CUDA path of resnet_lab once, and the timings that settle its CUDA rules, into one log and
# one CSV (issues 15 and 25). On a lent GPU machine (a copy of the tree, ../shared/tools/device-prep's
# .device/ beside it, no network), two commands of under 5 minutes each on an H100:
#
#   source .device/env.sh && benchmarks/gpu_smoke.sh --log "$OUT/smoke.log"
#   source .device/env.sh && benchmarks/gpu_smoke.sh --only compile-deep --log "$OUT/deep.log"
#
#   benchmarks/gpu_smoke.sh [--cpu] [--log FILE] [--only STEP,...] [--tracking-uri URI]
#
# Steps (ids): tests: the CUDA tests; kill: resnet-20 on synthetic data for 200 iterations with
# probes, killed (SIGKILL) after its first checkpoint; refuse: that checkpoint refused on the CPU
# (a CUDA checkpoint resumes only on CUDA); resume: resumed on CUDA into one FINISHED run; sync: 35
# training steps under torch.cuda.set_sync_debug_mode("error") (no host sync in the step); study: a
# 2-run study with --devices 0 --jobs 2; bench: throughput.py, the lab vs the reference loop for
# resnet-20/56/110 in fp32 and bf16, eager, plus probe_overhead.py; compile: resnet-20 compiled
# (default and reduce-overhead, fp32 and bf16); fused: benchmarks/fused_speed.py (bf16; --quick with --cpu);
# fashion: resnet-20 and plain-20 on real Fashion-MNIST for 2,000 iterations. Not in the first
# command (its compiles take minutes): compile-deep, resnet-56 and resnet-110 compiled likewise.
#
# Output: the log (FILE), FILE's stem + "-timings.csv" beside it (every timing of every step, one
# row each; the device returns at most 8 files, so one CSV), and at the end one table: the checks,
# images/s lab vs reference, every shipped study's full scale projected from the measured steps,
# and the compile rule those numbers support (resnet_lab/speed.py: COMPILE_AFTER_ITERATIONS_CUDA).
#
# --cpu: the same plumbing on the CPU on tiny settings (resnet-8; compiles traced with the "eager"
# backend, not built; the CUDA-only checks are skipped), so the script can be run, and tested, where
# there is no GPU (tests/test_gpu_smoke.py). --only runs the named steps; environment always runs.
# --tracking-uri: an existing MLflow store to use (default: a new one in a temporary folder).
# Python: $PYTHON, else python, else python3 (a GPU machine may have only python3).
# Exit status: 0 when no step failed (skipped steps are listed), 1 otherwise; 2 for a bad option.
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-$(command -v python || command -v python3 || echo python3)}
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
unset MLFLOW_TRACKING_URI

CPU=0
LOG=""
ONLY=""
URI=""
STEPS=" environment tests kill refuse resume sync study bench compile fused fashion compile-deep "
DEFAULT_SKIP=" compile-deep "  # the second command: --only compile-deep
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
    BENCH_MODELS=(resnet-8) DEEP_MODELS=(resnet-14) BACKEND=eager
    TIMING=(--windows 1 --steps 1 --warmup 1 --images 256 --ref-workers 0)
else
    DEV=cuda MODEL=20 ITERS=200 LOG_EVERY=10 CKPT_EVERY=50 BATCH=128 STUDY_ITERS=200 FASHION_ITERS=2000
    BENCH_MODELS=(resnet-20 resnet-56 resnet-110) DEEP_MODELS=(resnet-56 resnet-110) BACKEND=inductor
    TIMING=(--windows 3 --steps 30 --warmup 10 --images 16384 --ref-workers 4)
fi
LOG=${LOG:-benchmarks/results/$DEV-smoke-$(date +%Y-%m-%d-%H%M%S).log}
mkdir -p "$(dirname "$LOG")" && : >"$LOG"
LOG=$(cd "$(dirname "$LOG")" && pwd)/$(basename "$LOG")
CSV=${LOG%.*}-timings.csv
WORK=$(mktemp -d)
mkdir -p "$WORK/timings"
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
    if [ -z "$ONLY" ] && [[ $DEFAULT_SKIP == *" $id "* ]]; then return; fi
    echo "=== $name" >>"$LOG"
    "$@" >>"$LOG" 2>&1
    rc=$?
    local took=$((SECONDS - t0))s
    if [ $rc = 0 ]; then SUMMARY+=("ok    $took  $name")
    elif [ $rc = 77 ]; then SUMMARY+=("skip  $took  $name")
    else SUMMARY+=("FAIL  $took  $name (exit $rc)"); FAILED=1; fi
    say "${SUMMARY[-1]}"
    echo "$id|${SUMMARY[-1]}" >>"$WORK/steps.txt"
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
        tests/test_speed.py -k "cuda or test_gpu_paths" >"$WORK/pytest.txt" 2>&1
    local rc=$?
    cat "$WORK/pytest.txt"
    echo "RESULT CUDA tests: $(grep -E "(passed|failed|error)" "$WORK/pytest.txt" | tail -1)"
    return $rc
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
    # whatever precision this host's CPU picks: the device is what differs, and what to change
    [ $rc = 2 ] && grep -q "was written on cuda in .*(the device differs): resume it with --device cuda" <<<"$out"
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

throughput() {  # throughput NAME ARGS...: one CSV of its rows under $WORK/timings
    local name=$1
    shift
    (cd benchmarks && "$PY" throughput.py --device "$DEV" --formats channels_last --precisions fp32 bf16 \
        "${TIMING[@]}" --csv "$WORK/timings/$name.csv" "$@")
}

benchmarks() {
    throughput eager --models "${BENCH_MODELS[@]}" || return 1
    if [ "$CPU" = 1 ]; then
        (cd benchmarks && "$PY" probe_overhead.py --device cpu --models resnet-8 --rounds 1 --window 1 --warmup 1 \
            --flow-reps 1 --csv "$WORK/timings/probe_overhead.csv")
    else
        (cd benchmarks && "$PY" probe_overhead.py --device cuda --models resnet-20 --rounds 5 --window 10 \
            --warmup 2 --flow-reps 3 --csv "$WORK/timings/probe_overhead.csv")
    fi
}

compiled() {  # compiled NAME MODELS...: eager and both compile modes, the compiles in the first step's time
    local name=$1 modes=(default reduce-overhead)
    shift
    [ "$CPU" = 1 ] && modes=(default)  # CUDA graphs exist on CUDA only
    throughput "$name" --models "$@" --compile --compile-modes "${modes[@]}" --compile-backend "$BACKEND"
}

fused() {  # fused vs unfused steps, the projected paper-study time; bf16 on CUDA as the lab trains there
    [ -f benchmarks/fused_speed.py ] || { echo "skipped: no benchmarks/fused_speed.py"; return 77; }
    local how=(--precision bf16)
    [ "$CPU" = 1 ] && how=(--quick)  # the full CPU run takes many minutes
    (cd benchmarks && "$PY" fused_speed.py --device "$DEV" "${how[@]}" --csv "$WORK/timings/fused.csv")
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
step bench "benchmarks: throughput (eager) and probe overhead" benchmarks
step compile "resnet-$MODEL compiled: default and reduce-overhead" compiled compile "resnet-$MODEL"
step fused "fused nets vs separate (fused_speed.py)" fused
step fashion "Fashion-MNIST resnet-$MODEL and plain-$MODEL, $FASHION_ITERS it" fashion_mnist
step compile-deep "${DEEP_MODELS[*]} compiled: default and reduce-overhead" compiled compile-deep "${DEEP_MODELS[@]}"
RESULTS=$(grep -E "^(ENV|RESULT) " "$LOG")
echo "--- summary" >>"$LOG"
[ -n "$RESULTS" ] && say "$RESULTS"
printf '%s\n' "${SUMMARY[@]}" >>"$LOG"
"$PY" benchmarks/smoke_checks.py summary "$WORK" "$LOG" "$CSV" "$DEV" 2>&1 | tee -a "$LOG" || FAILED=1
say "$([ $FAILED = 0 ] && echo "smoke passed" || echo "smoke FAILED")"
exit $FAILED
