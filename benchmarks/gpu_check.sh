#!/usr/bin/env bash
# The one-call GPU check, for a bare GPU machine that already has torch, triton, nvcc, ninja and
# pybind11 (pytest-xdist and pytest-timeout used when present): no network, no pip, no root.
# Sized for one short window: every step under its own cap (seconds, each clamped to the time
# left) and all under one deadline, TOTAL_S=410 (under 7 minutes of a 10-minute command, build
# included). The correctness steps come first and their caps add up to 400 s at most, so the
# deadline never cuts one; the timing steps after them share what is left, in order of value.
#   step                 cap (env var, default)     expected on an H100/H200 (16 cores)
#   build                BUILD_TIMEOUT=80           39 s (2026-11-26 H200): setup.py build_ext --inplace,
#                                                   MAX_JOBS=nproc, FASTATTN_CUDA_ARCHS=9.0a
#   build (CPU only)     BUILD_CPU_TIMEOUT=50       only when that build fails: FASTATTN_NO_CUDA=1, so the
#                                                   Triton steps still run (the CUDA-only steps then skip:
#                                                   the sanitizers' 60 s pay for it)
#   versions             10 + 20                    nvidia-smi; python -m fastattn info (+ arch, backends)
#   tests                TEST_TIMEOUT=140           ~95 s: the default path's GPU tests, a curated list
#                                                   (GPU_TESTS below: how it is sized), TEST_WORKERS=12
#   checked configs      CHECKED_TIMEOUT=90         python -m fastattn.bench.triton_checked: every Triton
#                                                   candidate and shipped config against float64 ->
#                                                   checked.json, copied to fastattn/triton/tuned/checked-<arch>.json
#   sanitizers           SANITIZE_TIMEOUT=30 each   12 s + 15 s: compute-sanitizer memcheck, racecheck on
#                                                   benchmarks/cuda_sanitize.py (needs the cuda backend)
#   ---- correctness above (80 + 30 + 140 + 90 + 60 = 400 s of caps); timing below, each clamped ----
#   tune (opt-in)        TUNE=1, TUNE_BUDGET=150    python -m fastattn tune; winners become the defaults
#   bench                BENCH_TIMEOUT=90           python -m fastattn bench --quick --no-end-to-end
#                                                   (BENCH_FULL=1: the whole grid; END_TO_END=1: models)
#   plot                 30                         only when the bench was cut: plot the rows it saved
#   dispatch             20                         python -m fastattn tune --dispatch --from-record
#   gluon: check         GLUON_CHECK_TIMEOUT=60     benchmarks/gluon_check.py --check-only: each variant
#                                                   against float64 in its own process, all at once
#                                                   (GLUON_VARIANT_TIMEOUT=45 s each); opt-in backend
#   gluon: timing        GLUON_TIME_TIMEOUT=90      --time-only: the survivors against cuDNN, FA2, Triton
#   cuda goal            CUDA_GOAL_TIMEOUT=90       benchmarks/cuda_goal.py: CUDA C++ against FA2, cuDNN,
#                                                   Triton (rewritten after every case)
# Expected on an H200: ~245 s to the end of the sanitizers; the bench (cut at its cap if need be,
# its plot then drawn from the rows it saved) and the dispatch table by ~350 s, the Gluon check by
# ~390 s; the Gluon timing and the cuda goal get what is left (each writes as it goes). Each step
# start and end prints the UTC time and the seconds since the start; a summary table ends the log,
# even after a kill by SIGTERM.
# Outputs, at most 8 files (what a device run returns), in the output directory (first argument,
# else $OUT, else benchmarks/results/), each written as it happens so that a kill loses nothing:
#   gpu_check.log         this log; the commit is its first line
#   test_failures.log     each failing test's report, at once (only when one fails)
#   gpu_record.json       the bench record, rewritten after every case   gpu_plots.png   its charts
#   checked.json          the checked-config manifest    dispatch-table.json   the dispatch table
#   gluon_tuned.json      the fastest Gluon variant per head dim (ship as fastattn/gluon/tuned.json)
#   gpu_extras.json       the bundle, rewritten after every step: test_counts.txt (passed,failed,
#                         skipped), test_durations.json (seconds per test: the next sizing's input),
#                         gluon_checks.jsonl, gluon_record.json, cuda_goal.json, triton_tuned.json (TUNE=1),
#                         the commit; the tools write them into a staging folder outside the output
# The commit recorded: benchmarks/.commit (write it before a device run: `git rev-parse HEAD >
# benchmarks/.commit`, and carry it), else git rev-parse HEAD, else $FASTATTN_COMMIT.
# Usage: bash benchmarks/gpu_check.sh [OUT_DIR]
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
out_dir="${1:-${OUT:-benchmarks/results}}"
mkdir -p "$out_dir"
exec > >(trap '' TERM INT; exec tee "$out_dir/gpu_check.log") 2>&1  # tee outlives a group kill
tee_pid=$!

# benchmarks/.commit first: the device tool's copy of the tree can carry a stale .git
FASTATTN_COMMIT="$( { [[ -s benchmarks/.commit ]] && cat benchmarks/.commit; } || git rev-parse HEAD 2>/dev/null ||
  echo "${FASTATTN_COMMIT:-unknown}")"
export FASTATTN_COMMIT
echo "commit: $FASTATTN_COMMIT"

TOTAL_S=${TOTAL_S:-410}
BUILD_TIMEOUT=${BUILD_TIMEOUT:-80} BUILD_CPU_TIMEOUT=${BUILD_CPU_TIMEOUT:-50}
TEST_TIMEOUT=${TEST_TIMEOUT:-140} CHECKED_TIMEOUT=${CHECKED_TIMEOUT:-90} SANITIZE_TIMEOUT=${SANITIZE_TIMEOUT:-30}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-90} GLUON_CHECK_TIMEOUT=${GLUON_CHECK_TIMEOUT:-60}
GLUON_VARIANT_TIMEOUT=${GLUON_VARIANT_TIMEOUT:-45} GLUON_TIME_TIMEOUT=${GLUON_TIME_TIMEOUT:-90}
CUDA_GOAL_TIMEOUT=${CUDA_GOAL_TIMEOUT:-90}
# The correctness caps, the worse build branch counted (the CPU-only retry replaces the sanitizers)
correctness_s=$((BUILD_TIMEOUT + 10 + 20 + TEST_TIMEOUT + CHECKED_TIMEOUT +
  (2 * SANITIZE_TIMEOUT > BUILD_CPU_TIMEOUT ? 2 * SANITIZE_TIMEOUT : BUILD_CPU_TIMEOUT)))
echo "deadline: TOTAL_S=${TOTAL_S}s; correctness caps ${correctness_s}s"
((correctness_s > TOTAL_S)) &&
  echo "WARNING: the correctness caps exceed TOTAL_S: the deadline can cut a correctness step"

py="${PYTHON:-python3}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}" FASTATTN_CUDA_ARCHS="${FASTATTN_CUDA_ARCHS:-9.0a}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_DEFAULT_FP_FUSION="${TRITON_DEFAULT_FP_FUSION:-1}"
unset TRITON_INTERPRET
# The secondary files go to a staging folder outside the output and into one bundle
stage="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
bundle_json="$out_dir/gpu_extras.json"
export FASTATTN_LIVE_LOG="$out_dir/test_failures.log" FASTATTN_LIVE_COUNTS="$stage/test_counts.txt"
export FASTATTN_LIVE_DURATIONS="$stage/test_durations.json"
record="$out_dir/gpu_record.json" png="$out_dir/gpu_plots.png"
rm -f "$FASTATTN_LIVE_LOG" "$bundle_json" "$record" "$png" "$out_dir"/{checked,gluon_tuned,dispatch-table}.json  # this run's only

t0=$(date +%s)
deadline=$((t0 + TOTAL_S))
summary=() child='' current=''
stamp() { echo "$(date -u +%T) +$(($(date +%s) - t0))s"; }

# The staged files (a .json or .jsonl parsed, anything else as text) as one JSON object keyed by
# file name, replaced atomically; dot files are scratch.
bundle() {
  "$py" - "$stage" "$bundle_json" <<'EOF' || echo "bundle: could not write $bundle_json"
import json, os, sys
from pathlib import Path
stage, dest = Path(sys.argv[1]), Path(sys.argv[2])
bundle = {"commit": os.environ.get("FASTATTN_COMMIT")}
for f in sorted(stage.iterdir()):
    if not f.is_file() or f.name.startswith(".") or f.name.endswith(".tmp"):
        continue
    text = f.read_text(errors="replace")
    try:
        if f.suffix == ".json":
            bundle[f.name] = json.loads(text)
        elif f.suffix == ".jsonl":
            bundle[f.name] = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            bundle[f.name] = text
    except ValueError:  # caught mid-write: kept as text
        bundle[f.name] = text
tmp = dest.with_name(dest.name + ".tmp")
tmp.write_text(json.dumps(bundle, indent=1))
os.replace(tmp, dest)
EOF
}

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
  child='' current=''
  case $rc in 0) status=ok ;; 124 | 137) status="TIMED OUT at ${cap}s" ;; *) status="FAILED (exit $rc)" ;; esac
  echo "== [$(stamp)] end $name: $status after $(($(date +%s) - start))s"
  summary+=("$name|$((start - t0))|$(($(date +%s) - start))|$status")
  bundle
  return $rc
}
skip() { echo; echo "== [$(stamp)] $1: skipped, $2"; summary+=("$1|-|-|skipped: $2"); }

finish() {
  bundle
  echo; echo "== [$(stamp)] summary (output in $out_dir)"
  printf '%-22s %8s %8s  %s\n' step "start s" "took s" status
  local row files
  for row in "${summary[@]}"; do
    IFS='|' read -r name start took status <<<"$row"
    printf '%-22s %8s %8s  %s\n' "$name" "$start" "$took" "$status"
  done
  files=$(find "$out_dir" -maxdepth 1 -type f | wc -l)
  echo "output files: $files (a device run returns 8 at most)"
  ((files > 8)) && echo "WARNING: more than 8 files in $out_dir: $(find "$out_dir" -maxdepth 1 -type f -printf '%f ')"
  rm -rf "$stage"
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

# ---- correctness ----
if ! step build "$BUILD_TIMEOUT" "$py" setup.py -q build_ext --inplace; then
  echo "CUDA BUILD FAILED: retrying without CUDA, so that the Triton steps still run (the CUDA backend will be missing)"
  step "build (CPU only)" "$BUILD_CPU_TIMEOUT" env FASTATTN_NO_CUDA=1 "$py" setup.py -q build_ext --inplace ||
    echo "BUILD FAILED: the C++ backends will be missing"
fi

step "versions: nvidia-smi" 10 nvidia-smi
# fastattn's versions and backends, and (into scratch) this GPU's arch and the backends that run
probe="import sys, torch, fastattn
arch = 'sm%d%d' % torch.cuda.get_device_capability() if torch.cuda.is_available() else 'none'
open(sys.argv[1], 'w').write(arch + ' ' + ' '.join(fastattn.available_backends()) + '\n')"
step "versions: fastattn" 20 "$py" -c "from fastattn.__main__ import info; info()
$probe" "$stage/.probe"
[[ -s $stage/.probe ]] || timeout 30 "$py" -c "$probe" "$stage/.probe"  # the step failed: the probe alone
arch=none backends=
[[ -s $stage/.probe ]] && read -r arch backends <"$stage/.probe"
has() { [[ " $backends " == *" $1 "* ]]; }
echo "arch: $arch; backends: ${backends:-none}"

# The GPU test list: benchmarks/pytest_live.py's FASTATTN_SELECT, node-id patterns (`*`: any run of
# characters) in run order, most valuable first, so that a run cut at TEST_TIMEOUT loses the end.
# Sizing (the 2026-11-26 H200 run: 135 tests in 90 s on 8 xdist workers, 720 worker-s, ~5 a test;
# the same model below gives it ~700): a Triton test costs its new kernel specializations (dtype,
# head-dim block, causal, mask kind, varlen, dropout, modifiers; integer sizes are not
# specialized) at ~2 s a kernel to compile on those 16 cores (3 s here on 2 EPYC cores; sm_90 via
# Triton's compiler), 4 kernels for forward+backward (~8 s), 2 for decoding (~4 s), ~12 s with
# every modifier; a run 0.2-1 s; torch.compile ~10 s, reduce-overhead ~30 s; the CUDA C++ and
# torch SDPA tests compile nothing (~0.4 s). Estimated worker-seconds per group:
#   sdpa 57 tests 25 | Triton real sizes 8 (8 specializations) 75 | shapes 12 (10) 85 |
#   masks 20 (~7) 65 | packed 9 (~12 with the lone calls) 90 | decoding 58 (~24, 2 kernels) 135 |
#   modifiers at real tiles 13 (13, all-modifier kernels) 156 | launch 2 30 | Triton odd cases 6 50 |
#   GPU-only (host syncs, graphs, compile, tuning) 12 150 | CUDA C++ 63 25 | dispatch 10 15 |
#   non-finite policy (Triton, bf16) 11 (~10) 80 | Gluon backward's 9 (compiled by its own step) 20
# ~1005 worker-s + 12 workers x ~8 s start = ~1100 / 12 workers = ~92 s, + collection and the
# last test ~10 s: ~102 s of the 140 s cap (~290 tests). Left out (CI runs them on the CPU or they
# repeat a specialization): fp16/fp32 beside bf16 where only the dtype changes, the reference
# backend's rows, the CPU-tensor compile tests, test_gluon (its own step), test_triton_tiles (every
# config: the checked-configs step), test_every_candidate_config_is_right (the same). The
# bundle's test_durations.json gives the next sizing.
GPU_TESTS=$(cat <<'EOF'
tests/test_sdpa.py::*
tests/test_triton.py::test_real_sizes_on_gpu[*-torch.bfloat16]
tests/test_triton.py::test_real_sizes_on_gpu[*-128-torch.float16]
tests/test_triton.py::test_shapes[*-torch.bfloat16]
tests/test_triton.py::test_shapes[*-(1, 2, 2, 45, 70, 80)-torch.float32]
tests/test_triton.py::test_masks[*]
tests/test_varlen.py::test_each_sequence_equals_a_lone_call[*-torch.bfloat16-triton]
tests/test_varlen.py::test_each_sequence_equals_a_lone_call[(4, 2)-*-torch.float32-triton]
tests/test_varlen.py::test_dropout_draws_a_lone_call_per_sequence[triton]
tests/test_kvcache.py::test_equals_full_forward_on_the_valid_prefix[*-torch.bfloat16-triton]
tests/test_kvcache.py::test_equals_full_forward_on_the_valid_prefix[*-(8, 2)-*-torch.float32-triton]
tests/test_kvcache.py::test_equals_full_forward_on_the_valid_prefix[*-(6, 1)-*-torch.float16-triton]
tests/test_kvcache.py::test_score_mods_aligned_to_the_end[*-torch.bfloat16-triton]
tests/test_kvcache.py::test_long_cache_is_split_and_merged[triton]
tests/test_kvcache.py::test_cache_rows_before_the_window_are_never_read[triton]
tests/test_kvcache.py::test_writing_the_cache_bumps_its_version[triton]
tests/test_kvcache.py::test_decoding_has_one_alignment
tests/test_gpu.py::test_triton_score_mods_at_real_tile_sizes[*-128-torch.bfloat16]
tests/test_gpu.py::test_triton_score_mods_at_real_tile_sizes[6-64-torch.bfloat16]
tests/test_gpu.py::test_triton_score_mods_at_real_tile_sizes[10-64-torch.bfloat16]
tests/test_gpu.py::test_bf16_gradients_on_a_peaked_softmax[*]
tests/test_nonfinite.py::test_hidden_non_finite_values_never_reach_a_result[torch.bfloat16-*-triton]
tests/test_nonfinite.py::test_decoding_*-triton]
tests/test_nonfinite.py::test_*[triton]
tests/test_gpu.py::test_gluon_backward_keeps_hidden_nan_out[*]
tests/test_triton_launch.py::*
tests/test_triton.py::test_transposed_inputs_and_bf16_padding
tests/test_triton.py::test_fully_masked_rows_are_zero
tests/test_triton.py::test_dropout_matches_reference_with_the_kernels_mask
tests/test_triton.py::test_backward_is_deterministic
tests/test_triton.py::test_opcheck
tests/test_triton.py::test_fp32_dots_3xtf32_unless_torchs_switch_or_ours_says_otherwise
tests/test_gpu.py::test_reduce_overhead_compiles_the_decode_step
tests/test_gpu.py::test_compile_fullgraph_holds_one_fastattn_node[*]
tests/test_gpu.py::test_cuda_graph_replays_attention_and_decoding
tests/test_gpu.py::test_greedy_decoding_tunes_a_handful_of_times
tests/test_gpu.py::test_no_host_sync_*
tests/test_gpu.py::test_more_sequences_and_heads_than_a_grid_axis_takes
tests/test_gpu.py::test_fp32_dots_3xtf32_by_default_ieee_when_asked_tf32_when_opted_in
tests/test_cuda.py::*
tests/test_dispatch.py::*
EOF
)
gpu_test_files=()
while read -r f; do
  [[ -f $f ]] && gpu_test_files+=("$f")
done < <(sed -n 's/^\(tests\/[^:]*\)::.*/\1/p' <<<"$GPU_TESTS" | sort -u)
pytest_args=(-p no:cacheprovider -q -p pytest_live --continue-on-collection-errors --durations=15)
"$py" -c "import xdist" 2>/dev/null && pytest_args+=(-n "${TEST_WORKERS:-12}")
"$py" -c "import pytest_timeout" 2>/dev/null && pytest_args+=(--timeout "${TEST_CASE_TIMEOUT:-60}")
if ((${#gpu_test_files[@]})); then
  FASTATTN_SELECT="$GPU_TESTS" PYTHONPATH="$PWD/benchmarks:$PYTHONPATH" step tests "$TEST_TIMEOUT" \
    "$py" -m pytest "${pytest_args[@]}" "${gpu_test_files[@]}"
else
  skip tests "none of the listed test files exists"
fi
counts="$(cat "$FASTATTN_LIVE_COUNTS" 2>/dev/null || echo 0,-1,0)"
echo "GPU tests passed,failed,skipped: $counts (failures in full: $FASTATTN_LIVE_LOG)"

if ! has triton; then
  skip "checked configs" "no triton backend"
else
  step "checked configs" "$CHECKED_TIMEOUT" "$py" -m fastattn.bench.triton_checked "$out_dir/checked.json" \
    --commit "$FASTATTN_COMMIT"
  if [[ -s $out_dir/checked.json && $arch != none ]]; then
    mkdir -p fastattn/triton/tuned && cp "$out_dir/checked.json" "fastattn/triton/tuned/checked-$arch.json" &&
      echo "manifest: fastattn/triton/tuned/checked-$arch.json"
  fi
fi

if ! command -v compute-sanitizer >/dev/null; then
  skip sanitizers "no compute-sanitizer"
elif ! has cuda; then
  skip sanitizers "no cuda backend"
else
  for tool in memcheck racecheck; do
    step "sanitizer: $tool" "$SANITIZE_TIMEOUT" \
      compute-sanitizer --tool "$tool" --error-exitcode 3 "$py" benchmarks/cuda_sanitize.py
  done
fi

# ---- timing: each step clamped to what is left ----
if [[ ${TUNE:-} == 1 ]]; then  # opt-in: the sweep's winners become the defaults the bench then times
  step tune "$((${TUNE_BUDGET:-150} + 30))" "$py" -m fastattn tune --budget-s "${TUNE_BUDGET:-150}" \
    --json "$stage/triton_tuned.json"
  [[ -s $stage/triton_tuned.json && $arch != none ]] &&
    cp "$stage/triton_tuned.json" "fastattn/triton/tuned/$arch.json" &&
    echo "defaults: fastattn/triton/tuned/$arch.json"
fi

bench_args=()
[[ ${BENCH_FULL:-} == 1 ]] || bench_args+=(--quick)
[[ ${END_TO_END:-} == 1 ]] || bench_args+=(--no-end-to-end)
step bench "$BENCH_TIMEOUT" "$py" -m fastattn bench "${bench_args[@]}" --json "$record" --plot "$png" --tests "$counts"
if [[ -f $record && ! -f $png ]]; then  # cut short: plot the rows it saved
  step plot 30 "$py" -c "import json, sys; from fastattn.bench.record_report import plot
plot(json.load(open(sys.argv[1])), sys.argv[2])" "$record" "$png"
fi
if [[ -f $record ]]; then
  step dispatch 20 "$py" -m fastattn tune --dispatch --from-record "$record" --out "$out_dir/dispatch-table.json"
else
  skip dispatch "no bench record"
fi

if has gluon; then
  left=$((deadline - $(date +%s)))
  cap=$((GLUON_CHECK_TIMEOUT < left ? GLUON_CHECK_TIMEOUT : left))
  each=$((GLUON_VARIANT_TIMEOUT < cap - 10 ? GLUON_VARIANT_TIMEOUT : cap - 10))  # each ends, and says so
  ((each < 5)) && each=5
  step "gluon: check" "$cap" "$py" benchmarks/gluon_check.py "$stage" --check-only --timeout-s "$each"
  if grep -q '"status": "ok"' "$stage/gluon_checks.jsonl" 2>/dev/null; then  # a cut check times what passed
    step "gluon: timing" "$GLUON_TIME_TIMEOUT" "$py" benchmarks/gluon_check.py "$stage" --time-only \
      --tuned "$out_dir/gluon_tuned.json"
  else
    skip "gluon: timing" "no variant passed its check"
  fi
else
  skip gluon "no gluon backend (python -m fastattn info says why)"
fi

if has cuda; then
  step "cuda goal" "$CUDA_GOAL_TIMEOUT" "$py" benchmarks/cuda_goal.py "$stage"
else
  skip "cuda goal" "no cuda backend"
fi

echo; echo "== [$(stamp)] done"
