#!/usr/bin/env bash
# One GPU session for the speed-and-memory work (issue 10): about 4-6 minutes, never more than ~7.5:
#   1. installs the diffusers wheel carried in .whl/ (the GPU machine has no network and no diffusers),
#   2. benchmarks/gpu_issue10.py: the GPU-facing checks, PASS/FAIL with figures,
#   3. benchmarks/gpu_sd15.py at 512x512, batch 1, CFG, 50 DDIM steps, fp16: eager, diffusers,
#      channels_last, cudagraph, channels_last+cudagraph,
#   4. if at least 150 s are left before DEADLINE: one torch.compile config (with eager as reference),
# then prints one summary. Each stage has its own time limit, so the summary always comes.
#
#   bash benchmarks/gpu_issue10.sh                       # GPU machine; logs in $OUT (carry .whl)
#   # .whl/ (git-ignored) holds what that machine lacks; fill it here first:
#   #   python3 -m pip download --no-deps -d .whl diffusers==0.42.1 ftfy==6.3.1 wcwidth==0.9.4
#   PYTHON=.venv/bin/python bash benchmarks/gpu_issue10.sh --cpu-smoke     # here: tiny models, CPU
#
# Files written to $OUT (a temporary folder if unset): env.txt, issue10.log, issue10.json,
# sd15_fp16.log, sd15_compile.log, summary.txt.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-$(mktemp -d)}
export OUT PYTHONUNBUFFERED=1
DEADLINE=${DEADLINE:-400}  # seconds after the start by which the optional compile stage must end
SMOKE=""
if [ "${1:-}" = "--cpu-smoke" ]; then SMOKE=1; fi

# stage LIMIT LOG COMMAND...: run with a time limit, output to the terminal and to $OUT/LOG
stage() {
    local limit=$1 log=$2
    shift 2
    echo "=== [${SECONDS}s] $* (limit ${limit}s)"
    timeout -k 10 "$limit" "$@" 2>&1 | tee "$OUT/$log"
    local rc=${PIPESTATUS[0]}
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        echo "!!! stopped at its time limit (${limit}s)" | tee -a "$OUT/$log"
    fi
    echo "=== [${SECONDS}s] exit code $rc"
}

{
    date -u
    git log -1 --oneline 2>/dev/null && git status --short 2>/dev/null
    nvidia-smi 2>&1 | head -20
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && echo "installed: $(ls .whl)"
} > "$OUT/env.txt" 2>&1 || echo "!!! installing .whl/*.whl failed: see env.txt (diffusers comparisons will fail)"
export PYTHONPATH=/tmp/site:src
"$PY" -c "import sys, torch, diffusers; print('python', sys.version.split()[0], '| torch', torch.__version__,
'| cuda', torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name(), '| diffusers',
diffusers.__version__, diffusers.__file__)" 2>&1 | tee -a "$OUT/env.txt"

if [ -n "$SMOKE" ]; then
    stage 300 issue10.log "$PY" benchmarks/gpu_issue10.py --cpu-smoke
    stage 300 sd15_fp16.log "$PY" benchmarks/gpu_sd15.py --tiny --dtypes fp16 \
        --configs eager,diffusers,channels_last,cudagraph,channels_last+cudagraph
    echo "(--cpu-smoke: no torch.compile stage)" | tee "$OUT/sd15_compile.log"
else
    stage 240 issue10.log "$PY" benchmarks/gpu_issue10.py
    limit=$(( 420 - SECONDS )); if [ "$limit" -gt 200 ]; then limit=200; fi
    stage "$limit" sd15_fp16.log "$PY" benchmarks/gpu_sd15.py --dtypes fp16 \
        --configs eager,diffusers,channels_last,cudagraph,channels_last+cudagraph
    left=$(( DEADLINE - SECONDS ))
    if [ "$left" -ge 150 ]; then
        stage "$left" sd15_compile.log "$PY" benchmarks/gpu_sd15.py --dtypes fp16 \
            --configs eager,channels_last+compile=default
    else
        echo "(skipped the torch.compile stage: ${left}s left before ${DEADLINE}s)" | tee "$OUT/sd15_compile.log"
    fi
fi

{
    echo
    echo "================ summary (${SECONDS}s) ================"
    if grep -q "^== summary" "$OUT/issue10.log"; then
        sed -n '/^== summary/,$p' "$OUT/issue10.log"
    else  # stopped before its own summary: the rows it printed
        grep -E "^  \[|^!!!" "$OUT/issue10.log"
    fi
    for log in sd15_fp16.log sd15_compile.log; do
        echo
        echo "--- $log"
        grep -E "^(fp16|bf16|fp32):|^ {6}|^\(|stopped|Error" "$OUT/$log" | grep -v "^ *File " | head -20
    done
} | tee "$OUT/summary.txt"
