#!/usr/bin/env bash
# The one-call GPU check, for a bare GPU machine that already has torch, triton, nvcc, ninja and
# pybind11: no network, no pip downloads, no root assumed. In one go (well under 8 minutes on an
# H100) it
#   1. builds the extension (CUDA sources included where present; MAX_JOBS sized to the machine),
#   2. prints the GPU, driver, torch and triton versions,
#   3. measures the matmul and copy peaks,
#   4. runs all the tests (GPU ones included), and compute-sanitizer on the CUDA kernels,
#   5. runs the GPU benchmark grid,
#   6. writes the full log (with the summary tables), the JSON record and the plots to the output
#      directory: the first argument, else $OUT, else benchmarks/results/.
# A failing test does not stop the benchmark; a failing benchmark case does not stop the rest.
# QUICK=1 runs the benchmark's quick subset.      Usage: bash benchmarks/gpu_check.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
out_dir="${1:-${OUT:-benchmarks/results}}"
mkdir -p "$out_dir"
stamp="$(date -u +%Y-%m-%dT%H%M%SZ)"
exec > >(tee "$out_dir/gpu_check_$stamp.log") 2>&1
py="${PYTHON:-python3}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}" PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"
unset TRITON_INTERPRET
step() { echo; echo "== $* ($(date -u +%T))"; }

step "1. build, MAX_JOBS=$MAX_JOBS"
$py setup.py -q build_ext --inplace || echo "BUILD FAILED: the C++ backends will be missing"

step "2. versions"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "no nvidia-smi"
$py -m fastattn info

step "3. peaks"
$py -c "import json, torch; from fastattn.bench import peaks; print(json.dumps(peaks('cuda' if torch.cuda.is_available() else 'cpu')))"

step "4. tests"
junit="$(mktemp --suffix=.xml)"
timeout "${TEST_TIMEOUT:-360}" $py -m pytest tests -q -p no:cacheprovider --junitxml="$junit"
counts="$($py - "$junit" <<'PY'
import sys, xml.etree.ElementTree as ET
try:
    root = ET.parse(sys.argv[1]).getroot()
    suite = root if root.tag == "testsuite" else root[0]
    total, skipped = int(suite.get("tests")), int(suite.get("skipped"))
    failed = int(suite.get("failures")) + int(suite.get("errors"))
    print(f"{total - failed - skipped},{failed},{skipped}")
except Exception:  # no report (the run died): say so in the record
    print("0,-1,0")
PY
)"
echo "tests passed,failed,skipped: $counts"

step "4b. compute-sanitizer (memcheck, racecheck) on the CUDA kernels"
if command -v compute-sanitizer >/dev/null && $py -c "import sys, fastattn; sys.exit('cuda' not in fastattn.available_backends())"; then
  for tool in memcheck racecheck; do
    timeout 240 compute-sanitizer --tool "$tool" --error-exitcode 3 $py benchmarks/cuda_sanitize.py \
      && echo "compute-sanitizer $tool: clean" || echo "compute-sanitizer $tool: FAILED"
  done
else
  echo "skipped: no compute-sanitizer, or no cuda backend"
fi

step "5. benchmark grid"
FASTATTN_COMMIT="$(git rev-parse HEAD 2>/dev/null || echo "${FASTATTN_COMMIT:-unknown}")" \
  $py -m fastattn bench ${QUICK:+--quick} --json "$out_dir/gpu_$stamp.json" --plot "$out_dir/plots_$stamp" --tests "$counts"

step "6. done: $out_dir/gpu_check_$stamp.log, $out_dir/gpu_$stamp.json, $out_dir/plots_$stamp/"
