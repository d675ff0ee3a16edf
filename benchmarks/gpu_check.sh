#!/usr/bin/env bash
# One-shot check of the library on a CUDA machine: run from the repository root, results in $OUT.
#
#   bash benchmarks/gpu_check.sh            # on the device (OUT set by the device tool)
#   GPU_CHECK_FAKE=1 bash benchmarks/gpu_check.sh   # dry run on a CPU machine (tiny sizes)
#
# Stages, each under its own time limit, each run whatever the previous ones returned:
#   0. environment (GPU, versions) and the carried wheels (.whl/*.whl -> /tmp/site, PYTHONPATH)
#   1. tests/test_cuda.py with OPACUS_TEST_DEVICE=cuda
#   2. the whole CPU suite with -n 14 (compatibility with the device's torch / Python)
#   3. python -m benchmarks.run --device cuda on the listed models -> $OUT/bench_cuda.json
#   4. a short summary ($OUT/summary.txt, also printed last)
# Files under $OUT (at most 8): env.log, cuda_tests.log, cpu_suite.log, bench.log,
# bench_cuda.json, summary.txt.
# Environment knobs (all optional): GPU_CHECK_FAKE=1, GPU_CHECK_WHEELS (default .whl),
# GPU_CHECK_SUITE (default tests), GPU_CHECK_WORKERS (default 14), PYTHON (default python3).

set -u
set -o pipefail
export PYTHONUNBUFFERED=1

START=$(date +%s)
PY=${PYTHON:-python3}
FAKE=${GPU_CHECK_FAKE:-0}
WHEELS=${GPU_CHECK_WHEELS:-.whl}
if [ "$FAKE" = 1 ]; then
    OUT=${OUT:-/tmp/gpu_check_out}
    DEVICE=cpu
    SUITE=${GPU_CHECK_SUITE:-tests/grad_samples/test_linear.py tests/test_benchmarks.py}
    WORKERS=${GPU_CHECK_WORKERS:-2}
    BENCH_MODELS=mlp,attention_bf
    BENCH_EXTRA="--quick --repeats 1 --no-accountants"
    T_TESTS=300 T_SUITE=300 T_BENCH=120
else
    OUT=${OUT:?OUT must name the output folder}
    DEVICE=cuda
    SUITE=${GPU_CHECK_SUITE:-tests}
    WORKERS=${GPU_CHECK_WORKERS:-14}
    BENCH_MODELS=mlp,cnn,embedding,attention_bf,gpt2,gpt2_lora,gpt2_seq512
    BENCH_EXTRA="--repeats 10"
    # 20 (wheels) + 90 + 200 + 150 = 460 s of limits: the script ends within 8 minutes.
    T_TESTS=90 T_SUITE=200 T_BENCH=150
fi
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"

note() { echo "$*" | tee -a "$SUMMARY"; }
elapsed() { echo $(($(date +%s) - START)); }

# run_stage NAME LIMIT LOG QUIET CMD...: CMD under `timeout`, output to LOG (and to stdout unless
# QUIET=1); records the exit status and the duration in the summary.
run_stage() {
    local name=$1 limit=$2 log=$3 quiet=$4
    shift 4
    local t0 rc
    t0=$(date +%s)
    echo "=== $name (limit ${limit}s, at $(elapsed)s) ==="
    if [ "$quiet" = 1 ]; then
        timeout -k 10 "$limit" "$@" >"$log" 2>&1
        rc=$?
    else
        timeout -k 10 "$limit" "$@" 2>&1 | tee "$log"
        rc=${PIPESTATUS[0]}
    fi
    local what="rc=$rc"
    [ "$rc" = 124 ] || [ "$rc" = 137 ] && what="TIMED OUT after ${limit}s (rc=$rc)"
    note "$name: $what, $(($(date +%s) - t0))s"
    return 0
}

# ---------------------------------------------------------------- 0. environment and wheels
{
    echo "fake=$FAKE device=$DEVICE date=$(date -u +%FT%TZ) host=$(hostname)"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -3
    $PY - <<'EOF'
import sys, torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0), "capability", torch.cuda.get_device_capability(0))
for name in ("transformers", "peft", "hypothesis", "numpy", "scipy", "xdist"):
    try:
        print(name, __import__(name).__version__)
    except Exception as e:  # noqa: BLE001
        print(name, "MISSING", type(e).__name__)
EOF
    if compgen -G "$WHEELS/*.whl" >/dev/null; then
        echo "installing carried wheels: $(cd "$WHEELS" && echo *.whl)"
        timeout -k 5 20 $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --upgrade --target /tmp/site "$WHEELS"/*.whl && echo "wheels: installed"
    else
        echo "wheels: none in $WHEELS"
    fi
} 2>&1 | tee "$OUT/env.log"
if [ -d /tmp/site ]; then
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# The checkout is not pip-installed there: tests that start a subprocess or a notebook kernel
# (docs snippets, the auditing example, the notebooks) import opacus through PYTHONPATH.
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
$PY -c "import dp_accounting; print('dp_accounting importable from', dp_accounting.__file__)" \
    2>&1 | tail -1 | tee -a "$OUT/env.log"
$PY -c "import opacus; print('opacus from', opacus.__file__)" 2>&1 | tail -1 | tee -a "$OUT/env.log"
note "env: $(grep -m1 '^python' "$OUT/env.log"); $(grep -m1 '^gpu' "$OUT/env.log" || echo 'no gpu')"
note "$(grep -m1 '^wheels' "$OUT/env.log"); $(grep -E 'dp_accounting (importable|.*Error)|No module' "$OUT/env.log" | tail -1 | tail -c 120)"

# ---------------------------------------------------------------- 1. the CUDA tests
run_stage "cuda tests" "$T_TESTS" "$OUT/cuda_tests.log" 0 \
    env OPACUS_TEST_DEVICE="$DEVICE" $PY -m pytest -q -p no:cacheprovider -rfEs --durations=10 \
    tests/test_cuda.py

# ---------------------------------------------------------------- 2. the whole CPU suite
# -v gives each test's name and outcome as it finishes, so a timed-out run still says what failed.
# One thread per worker: 14 workers on 16 cores.
# shellcheck disable=SC2086
run_stage "cpu suite (-n $WORKERS)" "$T_SUITE" "$OUT/cpu_suite.log" 1 \
    env OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $PY -m pytest -v -p no:cacheprovider -n "$WORKERS" \
    -rfE --ignore=tests/test_cuda.py $SUITE
tail -3 "$OUT/cpu_suite.log"

# ---------------------------------------------------------------- 3. benchmarks
# shellcheck disable=SC2086
run_stage "benchmarks" "$T_BENCH" "$OUT/bench.log" 0 \
    $PY -m benchmarks.run --device "$DEVICE" --models "$BENCH_MODELS" $BENCH_EXTRA \
    --json "$OUT/bench_cuda.json"

# ---------------------------------------------------------------- 4. summary
{
    echo "--- cuda tests: $(grep -E '^(=+ )?[0-9]+ (passed|failed)|^[0-9]+ (passed|failed|skipped)|(passed|failed|error).* in [0-9.]+s' "$OUT/cuda_tests.log" | tail -1)"
    grep -E '^(FAILED|ERROR) ' "$OUT/cuda_tests.log" | head -30
    echo "--- cpu suite: $(grep -E '(passed|failed|error).* in [0-9.]+s' "$OUT/cpu_suite.log" | tail -1)"
    echo "    log tail: $(tail -2 "$OUT/cpu_suite.log" | tr '\n' ' ' | tail -c 300)"
    echo "    counted so far: $(grep -cE ' PASSED ' "$OUT/cpu_suite.log") passed, $(grep -cE ' FAILED ' "$OUT/cpu_suite.log") failed, $(grep -cE ' ERROR ' "$OUT/cpu_suite.log") errors, $(grep -cE ' SKIPPED ' "$OUT/cpu_suite.log") skipped"
    grep -E '^(FAILED|ERROR) ' "$OUT/cpu_suite.log" | head -30
    grep -E ' (FAILED|ERROR) ' "$OUT/cpu_suite.log" | grep -v '^FAILED\|^ERROR' | sed 's/^\[gw[0-9]*\] *\[ *[0-9]*%\] *//' | head -30
    echo "--- benchmarks (ms: wall on cuda):"
    grep -E '^\| ' "$OUT/bench.log" | grep -v -- '---' | head -40
} >>"$SUMMARY" 2>&1
echo "=== summary (total $(elapsed)s) ==="
echo "total: $(elapsed)s" >>"$SUMMARY"
cat "$SUMMARY"
