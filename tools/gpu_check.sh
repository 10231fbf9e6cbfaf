#!/usr/bin/env bash
# The GPU check in one command: environment, the GPU-marked tests, then the cost figures of the paper
# configuration, every figure as JSON under OUTDIR. About 8 minutes on one H100 (GPU_CHECK_BUDGET_S).
#
#   tools/gpu_check.sh OUTDIR
#
# OUTDIR receives at most 8 files (what a lent GPU machine sends back):
#   env.json                 versions, GPU, what the IoU counts use            (tools/gpu_report.py env)
#   stages.jsonl             one line per stage: status, exit code, seconds, time limit
#   logs.txt                 every stage's output (pytest -rA lists each test's outcome)
#   perf_gpu_all.json        every registered method at its default config, plus mtlora r16 / r32 and with
#                            activation checkpointing: Swin-T, 448 px, batch 32, fp16 AMP + GradScaler
#   perf_gpu_mtlora_bf16.json  mtlora (and the anchors) under bf16 autocast
#   perf_gpu_compile.json    torch.compile of full_ft, lora, mtlora (within its time limit, or absent)
#   paper_run.json           run_benchmark --method mtlora --preset paper on generated data, bounded; ETA
#   summary.json             all of the above in one table (tools/gpu_report.py summary)
# Each stage runs under its own `timeout` and writes its JSON atomically when it ends, so a stage that fails
# or runs out of time leaves the earlier stages' files intact. The exit code is 0 when every stage passed.
#
# Wheels: packages this machine lacks (mmengine, mmcv-lite, mmsegmentation, submitit and their own
# dependencies) are installed from a `.whl` folder at the repository root when there is one
# (tools/fetch_gpu_wheels.sh fills it) into GPU_CHECK_SITE, put first on PYTHONPATH; nothing is downloaded.
#
# Environment: GPU_CHECK_DEVICE=cpu runs the same stages on the CPU at toy sizes (swin_micro, 64 px, batch 2,
# one step, 1 iteration of the paper run at 224 px) to prove the plumbing; PYTHON (python3), GPU_CHECK_BUDGET_S
# (seconds for all stages: 480 on cuda, 2400 on cpu), GPU_CHECK_METHODS (comma-separated perf entries instead
# of every registered method), GPU_CHECK_PAPER_ITERS (iterations of the paper run: 40 on cuda),
# GPU_CHECK_SITE (/tmp/mtpeft-gpu-site), GPU_CHECK_ONLY (comma-separated stage names to run again into the
# same OUTDIR, e.g. perf_compile; wheels and env always run; logs.txt and stages.jsonl are appended to, never cleared).
set -uo pipefail

if [ $# -ne 1 ] || [ -z "$1" ]; then
    echo "usage: tools/gpu_check.sh OUTDIR" >&2
    exit 2
fi
mkdir -p "$1" || { echo "gpu_check: cannot create $1" >&2; exit 2; }
OUTDIR=$(cd "$1" && pwd)
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 2
PY=${PYTHON:-python3}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
case "$DEVICE" in
    cuda) BUDGET=${GPU_CHECK_BUDGET_S:-480} ;;
    cpu) BUDGET=${GPU_CHECK_BUDGET_S:-2400} ;;
    *) echo "gpu_check: GPU_CHECK_DEVICE must be cuda or cpu, got '$DEVICE'" >&2; exit 2 ;;
esac
SITE=${GPU_CHECK_SITE:-/tmp/mtpeft-gpu-site}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
LOG="$OUTDIR/logs.txt"
STAGES="$OUTDIR/stages.jsonl"
echo "[gpu_check] run of $(date -u +%Y-%m-%dT%H:%M:%SZ) on $DEVICE${GPU_CHECK_ONLY:+, stages $GPU_CHECK_ONLY}" >>"$LOG"
export PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
START=$(date +%s)
FAILED=0

# stage NAME CAP_SECONDS COMMAND...: run under `timeout` (the cap, or what is left of the budget), output
# appended to logs.txt, one line in stages.jsonl; the last lines of a failed stage's output on the console.
# Sets `status` (passed, failed, timed_out, skipped).
stage() {
    local name=$1 cap=$2
    shift 2
    if [ -n "${GPU_CHECK_ONLY:-}" ] && [ "$name" != env ] && [ "$name" != wheels ] && [[ ",$GPU_CHECK_ONLY," != *",$name,"* ]]; then
        return 0
    fi
    local left=$((BUDGET - ($(date +%s) - START)))
    local limit=$((cap < left ? cap : left))
    local t0 rc
    t0=$(date +%s)
    if [ "$limit" -lt 15 ]; then
        rc=-1
        status=skipped
        echo "[gpu_check] $name: skipped, ${left}s of the budget left" | tee -a "$LOG"
    else
        echo "[gpu_check] $name: start (limit ${limit}s) $(date -u +%H:%M:%S)" | tee -a "$LOG"
        timeout -k 10 "$limit" "$@" >"$WORK/stage.log" 2>&1
        rc=$?
        cat "$WORK/stage.log" >>"$LOG"
        case $rc in
            0) status=passed ;;
            124 | 137) status=timed_out ;;
            *) status=failed ;;
        esac
        if [ $rc -ne 0 ]; then
            tail -n 25 "$WORK/stage.log"
        fi
    fi
    [ "$status" = passed ] || FAILED=1
    local dt=$(($(date +%s) - t0))
    printf '{"stage": "%s", "status": "%s", "rc": %d, "seconds": %d, "limit_s": %d}\n' \
        "$name" "$status" "$rc" "$dt" "$limit" >>"$STAGES"
    echo "[gpu_check] $name: $status (exit $rc, ${dt}s)" | tee -a "$LOG"
    return 0
}

if compgen -G ".whl/*.whl" >/dev/null; then
    rm -rf "$SITE"
    stage wheels 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" .whl/*.whl
    export PYTHONPATH="$SITE:$PYTHONPATH"
fi

if [ "$DEVICE" = cuda ]; then
    PERF=(--device cuda --backbone swin_tiny --img 448 --batch 32 --steps 3 --warmup 1 --memory-jobs 4)
    PAPER_ITERS=${GPU_CHECK_PAPER_ITERS:-40}
    PAPER=(--preset paper)
    PAPER_VAL=640  # 20 validation batches: the first one's warm-up weighs little in the mean
    CAP_TEST=240 CAP_ALL=240 CAP_PAPER=150 CAP_BF16=90 CAP_COMPILE=240
else
    PERF=(--device cpu --backbone swin_micro --img 64 --batch 2 --steps 1 --warmup 0 --memory-jobs 2)
    PAPER_ITERS=${GPU_CHECK_PAPER_ITERS:-1}
    PAPER=(--preset paper --image-size 224)  # Swin-T's windows need 224 at least
    PAPER_VAL=2
    CAP_TEST=600 CAP_ALL=900 CAP_PAPER=600 CAP_BF16=400 CAP_COMPILE=120
fi
if [ -n "${GPU_CHECK_METHODS:-}" ]; then
    METHODS=$GPU_CHECK_METHODS
elif [ "$DEVICE" = cuda ]; then
    METHODS=$("$PY" -c "from methods import METHODS; print(','.join(METHODS.names()))") || METHODS=full_ft,lora,mtlora
else
    METHODS=lora,mtlora
fi
VARIANTS="mtlora[shared_rank=[16,16,16,16]],mtlora[shared_rank=[32,32,32,32]],mtlora[_checkpoint=all]"

# 1. the environment; without the device nothing else is worth running
stage env 60 "$PY" tools/gpu_report.py env --device "$DEVICE" --out "$OUTDIR/env.json"
if [ "$status" != passed ]; then
    echo "[gpu_check] no environment record: stopping (see $LOG)" >&2
    exit 1
fi

# 2. the GPU-marked tests (on the CPU they are all skipped, with the reason)
stage pytest_gpu "$CAP_TEST" "$PY" -m pytest -m gpu -q -rA -p no:cacheprovider tests

# 3. every method at the paper configuration, fp16 AMP training and fp32 evaluation as a real run, with the
#    FLOP ratio and the memory of each
stage perf_all "$CAP_ALL" "$PY" -m benchmark.perf "${PERF[@]}" --amp float16 --eval-fp32 \
    --methods "$METHODS,$VARIANTS" --json "$OUTDIR/perf_gpu_all.json"

# 4. the paper run itself, bounded: PAPER_ITERS iterations of batch 32 on generated PASCAL-sized images, one
#    epoch (so marked debug); its own logs give the iteration time, gpu_report the ETA of the 300 epochs
stage paper_data 120 "$PY" tools/gpu_report.py paper-data "$WORK/paper_data" --train $((32 * PAPER_ITERS)) \
    --val "$PAPER_VAL" --unique 64
stage paper_run "$CAP_PAPER" "$PY" -m benchmark.cli --method mtlora "${PAPER[@]}" --epochs 1 \
    --data "$WORK/paper_data" --device "$DEVICE" --work-dir "$WORK/paper_run"
stage paper_report 60 "$PY" tools/gpu_report.py paper-run "$WORK/paper_run" --out "$OUTDIR/paper_run.json"

# 5. bf16 against fp16 (the fp16 figures are step 3's)
stage perf_bf16 "$CAP_BF16" "$PY" -m benchmark.perf "${PERF[@]}" --amp bfloat16 --eval-fp32 --methods mtlora \
    --data-images 0 --json "$OUTDIR/perf_gpu_mtlora_bf16.json"

# 6. torch.compile where it compiles within the time left: the train step alone (one graph per model)
stage perf_compile "$CAP_COMPILE" "$PY" -m benchmark.perf "${PERF[@]}" --amp float16 --compile --train-only \
    --methods full_ft,lora,mtlora --no-memory --data-images 0 --json "$OUTDIR/perf_gpu_compile.json"

"$PY" tools/gpu_report.py summary "$OUTDIR" || FAILED=1
echo "[gpu_check] done in $(($(date +%s) - START))s; figures in $OUTDIR"
exit $FAILED
