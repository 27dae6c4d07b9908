"""The CUDA C++ kernels' goal rows (issue 26), a step of gpu_check.sh of its own so that a grid
cut short still measures them: forward and forward+backward, bf16 and fp16, D 128 and 64,
dense, causal, padded and heavy-padded at N 4096 (16k tokens, H·D 2048, the grid's shape),
fastattn:cuda against FlashAttention-2 (sdpa:flash; it takes no padding mask), cuDNN, SDPA's
default and fastattn:triton, side by side in one process, in that order of value.

    python benchmarks/cuda_goal.py OUT_DIR

Writes OUT_DIR/cuda_goal.json after every case (the record's row fields, plus fa2_ms and
vs_fa2 = FA2's time over fastattn:cuda's) and prints a line per case as it ends. gpu_check.sh
gives it its staging folder, so that the record reaches the run's output inside the one bundle
gpu_extras.json (a device run returns 8 files at most)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from fastattn.bench.attention import run_case
from fastattn.bench.cases import Case
from fastattn.bench.record_report import environment

PROVIDERS = frozenset({"fastattn:cuda", "fastattn:triton", "sdpa:flash", "sdpa:cudnn", "sdpa:default"})


def goal_cases() -> list[Case]:
    return [Case(kind, mode, dtype, 4, 2048 // D, 2048 // D, 4096, D)
            for dtype in ("bf16", "fp16") for D in (128, 64) for mode in ("fwd", "fwd+bwd")
            for kind in ("dense", "causal", "padded", "heavy-padded")]


def summarise(rows: list[dict]) -> dict | None:
    """fastattn:cuda's row of one case, with FA2's time and the ratio beside it."""
    cuda = next((r for r in rows if r["backend"] == "fastattn:cuda" and "ms" in r), None)
    if cuda is None:
        return None
    fa2 = next((r for r in rows if r["backend"] == "sdpa:flash" and "ms" in r), None)
    cuda["fa2_ms"] = fa2["ms"] if fa2 else None
    cuda["vs_fa2"] = fa2["ms"] / cuda["ms"] if fa2 else None
    return cuda


def main(out_dir: str) -> int:
    path = Path(out_dir) / "cuda_goal.json"
    record = dict(environment("cuda"), rows=[], goal="fastattn:cuda >= 1.0x sdpa:flash; padded rows keep their lead")
    for case in goal_cases():
        rows = run_case(case, "cuda", quick=False, min_run_time=0.0, only=PROVIDERS)
        record["rows"] += rows
        path.write_text(json.dumps(record, indent=1, default=str))
        cuda = summarise(rows)
        if cuda is None:
            print(f"{case.label}: fastattn:cuda did not run: {next((r.get('error') for r in rows if r['backend'] == 'fastattn:cuda'), 'not taken')}")
            continue
        fa2 = f"{cuda['vs_fa2']:.2f}x FA2 ({cuda['fa2_ms']:.3f} ms)" if cuda["vs_fa2"] else "FA2 n/a"
        print(f"{case.label}: cuda {cuda['ms']:.3f} ms {cuda['tflops']:.0f} TFLOPS, {fa2}, "
              f"{cuda['speedup_vs_best_peer']:.2f}x best peer {cuda['best_peer']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results"))
