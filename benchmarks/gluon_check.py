"""The Gluon step of gpu_check.sh: each variant of the Hopper forward checked against float64 in
its own process under a short timeout (a mbarrier that waits forever costs seconds, not the GPU
window), failures written as they happen; the survivors timed against cuDNN, FlashAttention-2
and fastattn's Triton kernel; the fastest variant per head dim written as the shipped default.

    python benchmarks/gluon_check.py OUT_DIR [--timeout-s 45]

Writes OUT_DIR/gluon_checks.jsonl (a line per variant, as it ends) and OUT_DIR/gluon_record.json
(rows with backend, case, ms, tflops, best_peer, best_peer_ms, speedup_vs_best_peer), and
fastattn/gluon/tuned.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# (B, H, Hkv, N, D, causal, padding): lengths off the tiles, GQA, both head dims, padding at the
# right (with one row padded throughout) and scattered
CHECK_SHAPES = [(2, 4, 4, 300, 128, False, None), (2, 4, 2, 300, 128, True, None), (1, 4, 1, 77, 64, True, None),
                (2, 2, 2, 1024, 64, False, None), (1, 2, 2, 1, 128, False, None), (3, 4, 2, 300, 128, True, "right"),
                (2, 2, 2, 200, 64, False, "scattered")]
CHILD = """
import json, sys, torch, fastattn
from fastattn.gluon import launch
from fastattn.masks import key_ranges
variant = launch.Variant(*json.loads(sys.argv[1]))
worst = 0.0
for B, H, Hkv, N, D, causal, padding in json.loads(sys.argv[2]):
    torch.manual_seed(0)
    q = torch.randn(B, N, H, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    k, v = (torch.randn(B, N, Hkv, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(2))
    kpm = None
    if padding == "right":
        lengths = torch.tensor([N, N // 3, 0][:B], device="cuda")
        kpm = torch.arange(N, device="cuda")[None, :] >= lengths[:, None]
    elif padding == "scattered":
        kpm = torch.rand(B, N, device="cuda") < 0.3
    out = torch.full_like(q, float("nan")).contiguous()
    lse = torch.full((B, H, N), float("nan"), device="cuda")
    launch.forward(q, k, v, out, lse, causal, D ** -0.5, kpm, None if kpm is None else key_ranges(kpm), variant=variant)
    ref, ref_lse = fastattn.reference_attention(q.double(), k.double(), v.double(), kpm, None, causal)
    err = ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    same_inf = torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    lse_err = (lse.double() - ref_lse)[finite].abs().max().item() if finite.any() else 0.0
    worst = max(worst, err)
    ok = torch.isfinite(out).all() and same_inf and err < 1e-2 and lse_err < 1e-2
    assert ok, (B, N, D, causal, padding, err, lse_err)
print(json.dumps({"max_rel_err": worst}))
"""


def run_isolated(argv: list[str], timeout_s: float) -> dict:
    """Runs a check in its own process: {"status": "ok" | "failed" | "timed out", "seconds", "output"}."""
    start = time.perf_counter()
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT)
        status, output = ("ok" if done.returncode == 0 else "failed"), (done.stdout + done.stderr)[-2000:]
    except subprocess.TimeoutExpired as e:
        status, output = "timed out", f"killed after {timeout_s} s: {(e.stdout or b'')[-500:]!r}"
    return {"status": status, "seconds": round(time.perf_counter() - start, 1), "output": output.strip()}


def check_variants(variants, out: Path, timeout_s: float, command=None) -> list:
    """The variants that pass; a line per variant appended to out as each ends. command(variant)
    -> argv: the check's process (a stand-in in tests)."""
    command = command or (lambda v: [sys.executable, "-c", CHILD, json.dumps(list(v)), json.dumps(CHECK_SHAPES)])
    passed = []
    for variant in variants:
        result = {"variant": list(variant), **run_isolated(command(variant), timeout_s)}
        with out.open("a") as f:
            f.write(json.dumps(result) + "\n")
        print(f"gluon {variant}: {result['status']} in {result['seconds']} s", flush=True)
        if result["status"] == "ok":
            passed.append(variant)
    return passed


def time_survivors(variants, record: Path) -> dict:
    """ms of each surviving variant and of the peers on dense, causal and GQA forwards (bf16,
    N 4096, B 4, H 16); returns {head dim: fastest variant}."""
    import torch
    import triton.testing
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import fastattn
    from fastattn.gluon import launch

    rows, best = [], {}
    for D in (128, 64):
        for kind in ("dense", "causal", "gqa"):
            B, H, N = 4, 2048 // D, 4096
            Hkv = H // 4 if kind == "gqa" else H
            q = torch.randn(B, N, H, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
            k, v = (torch.randn(B, N, Hkv, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(2))
            causal = kind == "causal"
            out, lse = torch.empty_like(q), torch.empty(B, H, N, device="cuda")
            fns = {f"gluon:{v_.name}": (lambda v_=v_: launch.forward(q, k, v, out, lse, causal, D ** -0.5, variant=v_))
                   for v_ in variants}
            fns["fastattn:triton"] = lambda: fastattn.attention(q, k, v, causal=causal, backend="triton")
            for name, backend in (("sdpa:cudnn", SDPBackend.CUDNN_ATTENTION),
                                  ("sdpa:flash", SDPBackend.FLASH_ATTENTION)):
                def sdpa(backend=backend):
                    with sdpa_kernel(backend):
                        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                                                                enable_gqa=Hkv != H)
                fns[name] = sdpa
            case = f"{kind} fwd bf16 B{B} H{H}{f'/{Hkv}kv' if Hkv != H else ''} N{N} D{D}"
            flops = 4.0 * B * H * N * N * D / (2 if causal else 1)
            timed = {}
            for name, fn in fns.items():
                try:
                    timed[name] = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
                except Exception as e:  # a peer that cannot run the case must not stop the rest
                    print(f"  {case} {name}: {type(e).__name__}: {e}"[:300], flush=True)
            peers = {n: ms for n, ms in timed.items() if not n.startswith(("gluon", "fastattn"))}
            peer = min(peers, key=peers.get) if peers else None
            for name, ms in timed.items():
                rows.append(dict(backend=name, case=case, ms=ms, tflops=flops / ms / 1e9, best_peer=peer,
                                 best_peer_ms=peers.get(peer), speedup_vs_best_peer=peers[peer] / ms if peer else None))
            ours = {n: ms for n, ms in timed.items() if n.startswith("gluon")}
            if ours and kind == "dense":
                best[D] = next(v_ for v_ in variants if f"gluon:{v_.name}" == min(ours, key=ours.get))
            record.write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))
    return best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--timeout-s", type=float, default=45)
    args = parser.parse_args(argv)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from fastattn.gluon.launch import TUNED, VARIANTS

    passed = check_variants(VARIANTS, out / "gluon_checks.jsonl", args.timeout_s)
    if not passed:
        print("gluon: no variant passed its check; nothing timed")
        return 1
    best = time_survivors(passed, out / "gluon_record.json")
    TUNED.write_text(json.dumps({f"d{D}": list(v) for D, v in best.items()}, indent=1) + "\n")
    print(f"gluon defaults: {best} -> {TUNED}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
