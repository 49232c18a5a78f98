#!/usr/bin/env bash
# The GPU record in one command: the device lane of the test suite, then the GPU rows of the benchmarks.
#
#   benchmarks/gpu_record.sh OUTDIR [STEP ...]
#
# Steps, in this order unless named: lane speed autocast llm video scale compile. Each writes its output, the
# benchmarks' Markdown tables included, to OUTDIR/STEP.log and stops at its own time limit, so that one slow step
# does not take the others' time; OUTDIR/summary.txt gets the machine's description, then one line per step (exit
# status, seconds) as it ends. Eight files in all, none in a subfolder.
#
# Environment: PYTHON (default .venv/bin/python when it exists, else python3), DEVICE (default cuda), and
# LIMIT_<STEP> in seconds to change a step's time limit (defaults below: about 9 minutes in all). lrp is imported
# from src/ when it is not installed, so a machine that has torch, torchvision and the benchmarks' packages needs no
# install. The record's figures go into benchmarks/results.md by hand, saying which machine ran them.
set -u
out=${1:?usage: benchmarks/gpu_record.sh OUTDIR [STEP ...]}
shift
steps=${*:-lane speed autocast llm video scale compile}
root=$(cd "$(dirname "$0")/.." && pwd)
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$root/.venv/bin/python" ]; then PYTHON=$root/.venv/bin/python; else PYTHON=python3; fi
fi
device=${DEVICE:-cuda}
export PYTHONUNBUFFERED=1 PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}"
command_of() {
    case $1 in
        lane) echo "env LRP_TEST_DEVICE=$device $PYTHON -m pytest -m device -rs -q -p no:cacheprovider --durations=15" ;;
        speed) echo "$PYTHON benchmarks/speed.py --device $device --quick" ;;
        autocast) echo "$PYTHON benchmarks/speed.py --device $device --quick --batches 1 --autocast bf16" ;;
        llm) echo "$PYTHON benchmarks/llm.py --device $device --quick" ;;
        video) echo "$PYTHON benchmarks/video.py --device $device --quick" ;;
        scale) echo "$PYTHON benchmarks/scale.py --repeats 1 --digits 2000 --gpu-images 2048" ;;
        compile) echo "$PYTHON benchmarks/compile_replay.py --device $device --model resnet50 --batch 1" ;;
        *) return 1 ;;
    esac
}

default_limit() {
    case $1 in
        lane) echo 200 ;; speed) echo 120 ;; autocast) echo 45 ;; llm) echo 60 ;; video) echo 45 ;; scale) echo 45 ;;
        compile) echo 45 ;;
    esac
}

for step in $steps; do
    command_of "$step" > /dev/null || { echo "gpu_record.sh: unknown step '$step' (steps: lane speed autocast llm video scale compile)" >&2; exit 2; }
done
out=$(mkdir -p "$out" && cd "$out" && pwd) || exit 2
cd "$root" || exit 2  # the steps name their scripts from the repository's root

{
    echo "gpu_record.sh $(date -u +%Y-%m-%dT%H:%MZ), device $device, $(git rev-parse --short HEAD 2>/dev/null || echo 'no git')"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
    "$PYTHON" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
} > "$out/summary.txt" 2>&1

for step in $steps; do
    cmd=$(command_of "$step")
    var=LIMIT_$(echo "$step" | tr a-z A-Z)
    limit=${!var:-$(default_limit "$step")}
    echo "== $step (at most ${limit}s): $cmd"
    start=$(date +%s)
    # shellcheck disable=SC2086  # the command is a word list on purpose
    timeout --kill-after=10 "$limit" $cmd > "$out/$step.log" 2>&1
    status=$?
    seconds=$(( $(date +%s) - start ))
    case $status in
        0) what="ok" ;; 124|137) what="stopped at its limit of ${limit}s" ;; *) what="failed" ;;
    esac
    echo "$step: exit $status ($what) in ${seconds}s; last line: $(tail -n 1 "$out/$step.log")" | tee -a "$out/summary.txt"
done
