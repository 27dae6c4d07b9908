#!/usr/bin/env bash
# The one-call GPU check, for a bare GPU machine that already has torch, triton, nvcc, ninja and
# pybind11 (pytest-xdist and pytest-timeout used when present): no network, no pip, no root.
# Steps, in order of value, each under its own timeout and all under one deadline (TOTAL_S, default
# 470 s, build included: under 8 minutes), so that a run cut short still leaves what matters most:
#   build      setup.py build_ext --inplace, MAX_JOBS = nproc, FASTATTN_CUDA_ARCHS=9.0a   BUILD_TIMEOUT=200
#   versions   nvidia-smi, python -m fastattn info                                         (30 s each)
#   gluon      benchmarks/gluon_check.py: each Gluon variant (forward, backward) against       GLUON_TIMEOUT=170
#              float64 in its own process, all at once (GLUON_VARIANT_TIMEOUT=60 s), the
#              survivors timed against cuDNN, FA2 and Triton (forward; forward+backward), the
#              fastest per head dim -> fastattn/gluon/tuned.json
#   tests      the GPU tests: test_triton/test_cuda/test_gpu, and the torch.compile ones   TEST_TIMEOUT=150
#              (TEST_WORKERS=8 with xdist, TEST_CASE_TIMEOUT=120 s per test with pytest-timeout)
#   sanitizer  compute-sanitizer memcheck, racecheck on benchmarks/cuda_sanitize.py        SANITIZE_TIMEOUT=60 each
#   cuda goal  benchmarks/cuda_goal.py: the CUDA C++ kernels against FA2 (sdpa:flash),     CUDA_GOAL_TIMEOUT=90
#              cuDNN and Triton, fwd and fwd+bwd, bf16/fp16, D 128/64, dense, causal,
#              padded, heavy-padded -> cuda_goal.json (rewritten after every case)
#   tune       python -m fastattn tune, leaving BENCH_RESERVE=150 s; its winners become    TUNE_BUDGET=150
#              fastattn/triton/tuned/sm<arch>.json, the defaults the benchmark then runs
#   bench      the benchmark grid (QUICK=1: the quick subset; END_TO_END=1: whole models)  BENCH_TIMEOUT=240
#              then, last, the window, softcap and sinks rows (their kernels tune at first use)
#   dispatch   this GPU's dispatch table from the grid's rows (python -m fastattn tune       (60 s)
#              --dispatch --from-record): dispatch-table.json, to ship as
#              fastattn/backends/tables/<gpu>.json, which backend="auto" then follows
# Each step start and end prints the UTC time and the seconds since the start; a summary table ends
# the log, even after a kill by SIGTERM. Outputs, in the output directory (first argument, else
# $OUT, else benchmarks/results/), written as they happen so a kill loses nothing before it:
#   gpu_check.log  test_failures.log (each failure, at once)  test_counts.txt (passed,failed,skipped)
#   gpu_record.json (rewritten after every bench case)  gpu_plots.png  tuned.json  dispatch-table.json
#   gluon_checks.jsonl (a line per variant, as it ends)  gluon_record.json  cuda_goal.json
# The commit recorded: benchmarks/.commit (write it before a device run: `git rev-parse HEAD >
# benchmarks/.commit`, and carry it), else git rev-parse HEAD, else $FASTATTN_COMMIT.
# Usage: bash benchmarks/gpu_check.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.."
out_dir="${1:-${OUT:-benchmarks/results}}"
mkdir -p "$out_dir"
exec > >(trap '' TERM INT; exec tee "$out_dir/gpu_check.log") 2>&1  # tee outlives a group kill
tee_pid=$!
py="${PYTHON:-python3}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}" FASTATTN_CUDA_ARCHS="${FASTATTN_CUDA_ARCHS:-9.0a}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"
unset TRITON_INTERPRET
export FASTATTN_LIVE_LOG="$out_dir/test_failures.log" FASTATTN_LIVE_COUNTS="$out_dir/test_counts.txt"
rm -f "$FASTATTN_LIVE_LOG" "$FASTATTN_LIVE_COUNTS"
record="$out_dir/gpu_record.json" png="$out_dir/gpu_plots.png"

t0=$(date +%s)
deadline=$((t0 + ${TOTAL_S:-470}))
summary=() child= current=
stamp() { echo "$(date -u +%T) +$(($(date +%s) - t0))s"; }

# step NAME CAP_S COMMAND...: COMMAND under `timeout`, the cap clamped to the time left. In the
# background, so that a TERM to this script reaches the trap at once and is passed on.
step() {
  local name=$1 cap=$2 left=$((deadline - $(date +%s))) start status rc
  shift 2
  ((cap > left)) && cap=$left
  if ((left < 5)); then
    echo "== [$(stamp)] $name: skipped, the deadline (TOTAL_S) is reached"
    summary+=("$name|-|-|skipped: deadline")
    return 1
  fi
  start=$(date +%s)
  echo; echo "== [$(stamp)] start $name (limit ${cap}s)"
  current="$name|$((start - t0))"
  timeout -k 5 "$cap" "$@" &
  child=$!
  wait "$child"
  rc=$?
  child= current=
  case $rc in 0) status=ok ;; 124 | 137) status="TIMED OUT at ${cap}s" ;; *) status="FAILED (exit $rc)" ;; esac
  echo "== [$(stamp)] end $name: $status after $(($(date +%s) - start))s"
  summary+=("$name|$((start - t0))|$(($(date +%s) - start))|$status")
  return $rc
}
skip() { echo; echo "== [$(stamp)] $1: skipped, $2"; summary+=("$1|-|-|skipped: $2"); }

finish() {
  echo; echo "== [$(stamp)] summary (output in $out_dir)"
  printf '%-22s %8s %8s  %s\n' step "start s" "took s" status
  local row
  for row in "${summary[@]}"; do
    IFS='|' read -r name start took status <<<"$row"
    printf '%-22s %8s %8s  %s\n' "$name" "$start" "$took" "$status"
  done
  echo "total: $(($(date +%s) - t0))s"
  exec >&- 2>&-
  wait "$tee_pid"  # the log is complete before the caller collects it
}
trap finish EXIT
on_signal() {
  [[ -n $child ]] && kill -TERM "$child" 2>/dev/null  # timeout passes it on to the step's processes
  [[ -n $current ]] && summary+=("$current|$(($(date +%s) - t0 - ${current#*|}))|KILLED (signal)")
  exit 143
}
trap on_signal TERM INT

step build "${BUILD_TIMEOUT:-200}" $py setup.py -q build_ext --inplace ||
  echo "BUILD FAILED: the C++/CUDA backends will be missing"

step "versions: nvidia-smi" 30 nvidia-smi
step "versions: fastattn" 30 $py -m fastattn info

if $py -c "import sys, fastattn; sys.exit('gluon' not in fastattn.available_backends())" 2>/dev/null; then
  step gluon "${GLUON_TIMEOUT:-170}" $py benchmarks/gluon_check.py "$out_dir" --timeout-s "${GLUON_VARIANT_TIMEOUT:-60}"
else
  skip gluon "no gluon backend (python -m fastattn info says why)"
fi

gpu_tests=()
for f in tests/test_triton.py tests/test_cuda.py tests/test_gpu.py tests/test_varlen.py tests/test_kvcache.py \
  tests/test_sdpa.py tests/test_dispatch.py tests/test_triton_launch.py tests/test_gluon.py; do [[ -f $f ]] && gpu_tests+=("$f"); done
pytest_args=(-p no:cacheprovider -q -p pytest_live --continue-on-collection-errors
  -k "(test_triton.py or test_cuda.py or test_gpu.py or test_varlen.py or test_kvcache.py or test_sdpa.py or test_dispatch.py or test_triton_launch.py or test_gluon.py or compile) and not sm90 and not test_variant_against_float64")  # sm90: CI compiles it; the gluon step checks the variants
$py -c "import xdist" 2>/dev/null && pytest_args+=(-n "${TEST_WORKERS:-8}")
$py -c "import pytest_timeout" 2>/dev/null && pytest_args+=(--timeout "${TEST_CASE_TIMEOUT:-120}")
PYTHONPATH="$PWD/benchmarks:$PYTHONPATH" step tests "${TEST_TIMEOUT:-150}" \
  $py -m pytest "${pytest_args[@]}" "${gpu_tests[@]}" tests/test_api.py tests/test_replace.py
counts="$(cat "$FASTATTN_LIVE_COUNTS" 2>/dev/null || echo 0,-1,0)"
echo "GPU tests passed,failed,skipped: $counts (failures in full: $FASTATTN_LIVE_LOG)"

if ! command -v compute-sanitizer >/dev/null; then
  skip compute-sanitizer "no compute-sanitizer"
elif ! $py -c "import sys, fastattn; sys.exit('cuda' not in fastattn.available_backends())"; then
  skip compute-sanitizer "no cuda backend"
else
  for tool in memcheck racecheck; do
    step "sanitizer: $tool" "${SANITIZE_TIMEOUT:-60}" \
      compute-sanitizer --tool "$tool" --error-exitcode 3 $py benchmarks/cuda_sanitize.py
  done
fi

# benchmarks/.commit first: the device tool's copy of the tree can carry a stale .git
FASTATTN_COMMIT="$(cat benchmarks/.commit 2>/dev/null || git rev-parse HEAD 2>/dev/null || echo "${FASTATTN_COMMIT:-unknown}")"
export FASTATTN_COMMIT
echo "commit: $FASTATTN_COMMIT"
if $py -c "import sys, fastattn; sys.exit('cuda' not in fastattn.available_backends())" 2>/dev/null; then
  step "cuda goal" "${CUDA_GOAL_TIMEOUT:-90}" $py benchmarks/cuda_goal.py "$out_dir"
else
  skip "cuda goal" "no cuda backend"
fi

# The sweep goes before the benchmark, which then times its winners; what it leaves is kept.
budget=${TUNE_BUDGET:-150} left=$((deadline - $(date +%s) - ${BENCH_RESERVE:-150}))
((budget > left)) && budget=$left
if ((budget < 20)); then
  skip tune "under 20 s left before the benchmark's reserve"
elif ! timeout 60 $py -m fastattn tune --help >/dev/null 2>&1; then
  skip tune "no 'python -m fastattn tune'"
else
  step tune $((budget + 30)) $py -m fastattn tune --budget-s "$budget" --json "$out_dir/tuned.json"
  arch="$($py -c 'import torch; print("sm%d%d" % torch.cuda.get_device_capability())')"
  [[ -f $out_dir/tuned.json ]] && cp "$out_dir/tuned.json" "fastattn/triton/tuned/$arch.json" && echo "defaults: fastattn/triton/tuned/$arch.json"
fi

e2e=--no-end-to-end
[[ ${END_TO_END:-} == 1 ]] && e2e=
step bench "${BENCH_TIMEOUT:-240}" $py -m fastattn bench ${QUICK:+--quick} $e2e --json "$record" --plot "$png" --tests "$counts"
if [[ -f $record && ! -f $png ]]; then  # cut short: plot the rows it saved
  step plot 60 $py -c "import json, sys; from fastattn.bench.report import plot; plot(json.load(open(sys.argv[1])), sys.argv[2])" "$record" "$png"
fi
[[ -f $record ]] && step dispatch 60 $py -m fastattn tune --dispatch --from-record "$record" --out "$out_dir/dispatch-table.json"

echo; echo "== [$(stamp)] done"
