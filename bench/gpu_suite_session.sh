#!/usr/bin/env bash
# One device call: the test suite on the GPU, where tests/test_ops.py and the kernel tests run their CUDA forms
# (CI has no GPU: it runs them in the interpreter or skips them). pytest-xdist spreads the tests, and with them the
# Triton compiles, over WORKERS processes. Phase 1: the files with GPU paths (kernels, captured graphs); phase 2:
# the rest of tests/ while time is left. Carry .whl (its pytest_xdist / execnet wheels, bench/carry_env.sh's).
# Output under $OUT: gpu_suite_1.log, gpu_suite_2.log (-v: one line a test as it ends, so a cut run still names
# what passed; failures' tracebacks at the end of a finished phase).
set -u
ROOT=$PWD; mkdir -p $OUT; source bench/carry_env.sh
python -c "import xdist" 2>/dev/null || python -m pip install -q --no-deps --target /tmp/carry .whl/pytest_xdist-*.whl \
  .whl/execnet-*.whl
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
START=$(date +%s); BUDGET=${BUDGET:-540}
left() { echo $((BUDGET - ($(date +%s) - START))); }
GPU_FILES=${GPU_FILES:-"tests/test_ops.py tests/test_quant_kernels.py tests/test_models.py tests/test_speculative.py
tests/test_bounded_cache.py tests/test_fuse.py tests/test_route.py tests/test_split.py tests/test_kernels_aot.py"}
suite() {  # $1: log name, then pytest's arguments
  local log=$OUT/$1; shift
  timeout $(( $(left) - 10 )) python -m pytest -v -n ${WORKERS:-12} -p no:cacheprovider --tb=short -rfE \
    --continue-on-collection-errors "$@" > "$log" 2>&1
  echo "$log: rc $? at $(( $(date +%s) - START )) s: $(grep -c ' PASSED' "$log") passed, $(grep -c ' FAILED' "$log")" \
    "failed, $(grep -c ' SKIPPED' "$log") skipped, $(grep -c ' ERROR' "$log") errors"
  tail -3 "$log"
}
suite gpu_suite_1.log $GPU_FILES
[ "$(left)" -gt 60 ] && suite gpu_suite_2.log tests $(for f in $GPU_FILES; do echo --ignore=$f; done)
echo "done at $(( $(date +%s) - START )) s"
