"""The Gluon steps of gpu_check.sh: each variant of the Hopper forward and of the backward checked
against float64 in its own process under a short timeout (a mbarrier that waits forever costs
seconds, not the GPU window), all at once (their compiles share the CPUs), each line written as
it ends; the survivors timed against cuDNN, FlashAttention-2 and fastattn's Triton kernels
(forward; forward+backward); the fastest variant per head dim written as the tuned defaults.

    python benchmarks/gluon_check.py OUT_DIR [--timeout-s 60] [--check-only | --time-only]
                                     [--tuned PATH] [--install]

Writes OUT_DIR/gluon_checks.jsonl (a line per variant, as it ends), OUT_DIR/gluon_record.json
(rows with backend, case, ms, tflops, best_peer, best_peer_ms, speedup_vs_best_peer) and the
defaults to --tuned (default OUT_DIR/gluon_tuned.json), never into the source tree unless
--install says so (then fastattn/gluon/tuned.json too, which the gluon backend reads: ship that
file from a GPU run's output). --check-only stops after the checks (exit 1 if none passed);
--time-only times the variants OUT_DIR/gluon_checks.jsonl says passed (gpu_check.sh runs the two
halves as two steps, each under its own cap).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# (B, H, Hkv, N, D, causal, padding): lengths off the tiles, GQA, both head dims, padding at the
# right (with one row padded throughout) and scattered
CHECK_SHAPES = [(2, 4, 4, 300, 128, False, None), (2, 4, 2, 300, 128, True, None), (1, 4, 1, 77, 64, True, None),
                (2, 2, 2, 1024, 64, False, None), (1, 2, 2, 1, 128, False, None), (3, 4, 2, 300, 128, True, "right"),
                (2, 2, 2, 200, 64, False, "scattered")]
# what both check children begin with: argv[1] the variant, argv[2] the shapes, inputs(shape)
PRELUDE = """
import json, sys, torch, fastattn
from fastattn.gluon import launch
from fastattn.masks import key_ranges
def inputs(B, H, Hkv, N, D, padding):
    torch.manual_seed(0)
    q = torch.randn(B, N, H, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
    k, v = (torch.randn(B, N, Hkv, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(2))
    kpm = None
    if padding == "right":
        lengths = torch.tensor([N, N // 3, 0][:B], device="cuda")
        kpm = torch.arange(N, device="cuda")[None, :] >= lengths[:, None]
    elif padding == "scattered":
        kpm = torch.rand(B, N, device="cuda") < 0.3
    return q, k, v, kpm
worst = 0.0
"""
CHILD = PRELUDE + """
variant = launch.Variant(*json.loads(sys.argv[1]))
for B, H, Hkv, N, D, causal, padding in json.loads(sys.argv[2]):
    q, k, v, kpm = inputs(B, H, Hkv, N, D, padding)
    out = torch.full_like(q, float("nan")).contiguous()
    lse = torch.full((B, H, N), float("nan"), device="cuda")
    # 3 programs: a persistent variant takes several tiles each, in turn
    launch.forward(q, k, v, out, lse, causal, D ** -0.5, kpm, None if kpm is None else key_ranges(kpm), variant=variant,
                   programs=3)
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
# the backward against float64 gradients, lse's included: out and lse from the reference, so that
# a backward variant is checked whether or not a forward one passed
BWD_CHECK_SHAPES = [(2, 4, 2, 300, 128, True, None), (2, 4, 4, 260, 128, False, None), (1, 4, 1, 77, 64, True, None),
                    (2, 2, 2, 200, 64, False, None), (3, 4, 2, 300, 128, True, "right"),
                    (2, 2, 2, 200, 64, False, "scattered")]
BWD_CHILD = PRELUDE + """
variant = launch.BwdVariant(*json.loads(sys.argv[1]))
for B, H, Hkv, N, D, causal, padding in json.loads(sys.argv[2]):
    q, k, v, kpm = inputs(B, H, Hkv, N, D, padding)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = fastattn.reference_attention(qd, kd, vd, kpm, None, causal)
    dout = torch.randn_like(q)
    dlse = torch.randn(B, H, N, device="cuda")
    seen = torch.isfinite(ref_lse)
    loss = (ref * dout.double()).sum() + torch.where(seen, ref_lse * dlse.double(), 0.0).sum()
    grads = torch.autograd.grad(loss, (qd, kd, vd))
    out = ref.detach().to(torch.bfloat16).contiguous()
    lse = ref_lse.detach().float().contiguous()
    dq = torch.full((B, H, N, D), float("nan"), device="cuda", dtype=torch.bfloat16)
    dk, dv = (torch.full((B, Hkv, N, D), float("nan"), device="cuda", dtype=torch.bfloat16) for _ in range(2))
    launch.backward(dout, q, k, v, out, lse, dq, dk, dv, causal, D ** -0.5, kpm, None if kpm is None else key_ranges(kpm),
                    dlse, variant=variant)
    for name, got, want in zip("qkv", (dq, dk, dv), grads):
        err = ((got.double() - want).norm() / want.norm().clamp_min(1e-30)).item()
        worst = max(worst, err)
        assert torch.isfinite(got).all() and err < 1e-2, (B, N, D, causal, padding, "d" + name, err)
print(json.dumps({"max_rel_err": worst}))
"""


def check_variants(variants, out: Path, timeout_s: float, command=None) -> list:
    """The variants that pass, each checked in its own process, all at once, each killed at
    timeout_s; a line per variant appended to out as each ends. command(variant) -> argv: the
    check's process (a stand-in in tests)."""
    command = command or check_command
    start, running, results, logs = time.perf_counter(), {}, {}, {}
    for variant in variants:
        logs[variant] = tempfile.TemporaryFile("w+")  # a pipe left unread could block a talkative child
        running[variant] = subprocess.Popen(command(variant), stdout=logs[variant], stderr=subprocess.STDOUT,
                                            text=True, cwd=ROOT)
    while running:
        for variant, proc in list(running.items()):
            seconds = time.perf_counter() - start
            if proc.poll() is None and seconds < timeout_s:
                continue
            if proc.poll() is None:
                proc.kill()
                proc.wait()
                status, output = "timed out", f"killed after {timeout_s} s"
            else:
                logs[variant].seek(0)
                status, output = ("ok" if proc.returncode == 0 else "failed"), logs[variant].read()[-2000:].strip()
            logs.pop(variant).close()
            del running[variant]
            results[variant] = result = {"variant": list(variant), "status": status, "seconds": round(seconds, 1),
                                         "output": output}
            with out.open("a") as f:
                f.write(json.dumps(result) + "\n")
            print(f"gluon {variant}: {status} in {result['seconds']} s", flush=True)
        time.sleep(0.05)
    return [v for v in variants if results[v]["status"] == "ok"]


def check_command(variant) -> list[str]:
    from fastattn.gluon.launch import BwdVariant

    child, shapes = (BWD_CHILD, BWD_CHECK_SHAPES) if isinstance(variant, BwdVariant) else (CHILD, CHECK_SHAPES)
    return [sys.executable, "-c", child, json.dumps(list(variant)), json.dumps(shapes)]


def time_survivors(fwd_variants, bwd_variants, record: Path, progress=None) -> dict:
    """ms of each surviving variant and of the peers on dense, causal and GQA calls (bf16, N 4096,
    B 4, H 16 at D 128), forward, then forward+backward (ours: the fastest forward variant, or the
    Triton forward where none passed, then each backward variant); returns the tuned.json entries
    {"d<D>": fastest forward, "bwd_d<D>": fastest backward} (on the dense case). The dense cases
    of both head dims go first and progress(best) follows each case, so that a step cut at its
    time limit still leaves both head dims' defaults."""
    import torch

    from fastattn.gluon import launch

    rows, best = [], {}
    for kind in ("dense", "causal", "gqa"):
        for D in (128, 64):
            B, H, N = 4, 2048 // D, 4096
            Hkv = H // 4 if kind == "gqa" else H
            q = torch.randn(B, N, H, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
            k, v = (torch.randn(B, N, Hkv, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(2))
            causal, scale = kind == "causal", D ** -0.5
            out, lse = torch.empty_like(q), torch.empty(B, H, N, device="cuda")
            dout = torch.randn_like(out)
            grads = [torch.empty(B, h, N, D, device="cuda", dtype=torch.bfloat16) for h in (H, Hkv, Hkv)]
            name = f"{kind} %s bf16 B{B} H{H}{f'/{Hkv}kv' if Hkv != H else ''} N{N} D{D}"
            flops = 4.0 * B * H * N * N * D / (2 if causal else 1)

            fwd = {f"gluon:{x.name}": (lambda x=x: launch.forward(q, k, v, out, lse, causal, scale, variant=x))
                   for x in fwd_variants}
            timed = _time_with_peers(fwd, q, k, v, causal, Hkv != H, None, name % "fwd", flops, rows)
            ours = {n: ms for n, ms in timed.items() if n.startswith("gluon")}
            if ours and kind == "dense":
                best[f"d{D}"] = next(x for x in fwd_variants if f"gluon:{x.name}" == min(ours, key=ours.get))
            fastest = min(ours, key=ours.get) if ours else None

            def ours_fwd_bwd(x, first=fwd.get(fastest)):
                if first is None:  # no Gluon forward: the Triton one gives out and lse
                    import fastattn.triton.attention as ta
                    from fastattn.call import Call

                    ta.forward(q, k, v, out, lse, Call(causal=causal, scale=scale))
                else:
                    first()
                launch.backward(dout, q, k, v, out, lse, *grads, causal, scale, variant=x)

            both = {f"{fastest or 'triton-fwd'}+gluon-bwd:{x.name}": (lambda x=x: ours_fwd_bwd(x))
                    for x in bwd_variants}
            timed = _time_with_peers(both, q, k, v, causal, Hkv != H, dout, name % "fwd+bwd", 2.5 * flops, rows)
            ours = {n: ms for n, ms in timed.items() if "gluon-bwd" in n}
            if ours and kind == "dense":
                best[f"bwd_d{D}"] = next(x for x in bwd_variants if min(ours, key=ours.get).endswith(x.name))
            record.write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))
            if progress is not None:
                progress(best)
    return best


def _time_with_peers(fns: dict, q, k, v, causal: bool, gqa: bool, dout, case: str, flops: float, rows: list) -> dict:
    """Times fns and the peers (cuDNN, FlashAttention-2, fastattn's Triton kernels) on the same
    call, forward alone or with dout its backward; appends the rows; returns {name: ms}."""
    import torch
    import triton.testing
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import fastattn

    qg, kg, vg = (t.detach().requires_grad_(dout is not None) for t in (q, k, v))

    def peer(call):
        def run():
            o = call()
            if dout is not None:
                torch.autograd.grad(o, (qg, kg, vg), dout)
        return run

    fns = dict(fns)
    fns["fastattn:triton"] = peer(lambda: fastattn.attention(qg, kg, vg, causal=causal, backend="triton"))
    for name, backend in (("sdpa:cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa:flash", SDPBackend.FLASH_ATTENTION)):
        def sdpa(backend=backend):
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(qg, kg, vg, is_causal=causal, enable_gqa=gqa)
        fns[name] = peer(sdpa)
    timed = {}
    for name, fn in fns.items():
        try:
            timed[name] = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
        except Exception as e:  # a peer that cannot run the case must not stop the rest
            print(f"  {case} {name}: {type(e).__name__}: {e}"[:300], flush=True)
    peers = {n: ms for n, ms in timed.items() if n.startswith("sdpa")}
    best = min(peers, key=peers.get) if peers else None
    for name, ms in timed.items():
        rows.append(dict(backend=name, case=case, ms=ms, tflops=flops / ms / 1e9, best_peer=best,
                         best_peer_ms=peers.get(best), speedup_vs_best_peer=peers[best] / ms if best else None))
    return timed


def passed_in(checks: Path) -> list:
    """The variants a checks file (gluon_checks.jsonl) says passed, in its order."""
    from fastattn.gluon.launch import BWD_VARIANTS, VARIANTS

    known = {tuple(v): v for v in VARIANTS + BWD_VARIANTS}
    rows = [json.loads(line) for line in checks.read_text().splitlines() if line.strip()] if checks.exists() else []
    return [known[tuple(r["variant"])] for r in rows if r.get("status") == "ok" and tuple(r["variant"]) in known]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--timeout-s", type=float, default=60)
    half = parser.add_mutually_exclusive_group()
    half.add_argument("--check-only", action="store_true", help="check the variants, time none")
    half.add_argument("--time-only", action="store_true", help="time the variants OUT_DIR/gluon_checks.jsonl passed")
    parser.add_argument("--tuned", help="where the fastest variants go (default OUT_DIR/gluon_tuned.json)")
    parser.add_argument("--install", action="store_true", help="also write fastattn/gluon/tuned.json")
    args = parser.parse_args(argv)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from fastattn.gluon.launch import BWD_VARIANTS, TUNED, VARIANTS, BwdVariant

    checks = out / "gluon_checks.jsonl"
    if args.time_only:
        passed = passed_in(checks)
    else:
        checks.unlink(missing_ok=True)  # this run's lines only
        passed = check_variants(VARIANTS + BWD_VARIANTS, checks, args.timeout_s)
    if not passed:
        print("gluon: no variant passed its check; nothing timed")
        return 1
    if args.check_only:
        print(f"gluon: {len(passed)} of {len(VARIANTS + BWD_VARIANTS)} variants passed: {[v.name for v in passed]}")
        return 0
    bwd = [v for v in passed if isinstance(v, BwdVariant)]
    fwd = [v for v in passed if v not in bwd]
    paths = [Path(args.tuned) if args.tuned else out / "gluon_tuned.json"] + ([TUNED] if args.install else [])

    def write_tuned(best: dict) -> None:
        if best:
            text = json.dumps({name: list(v) for name, v in best.items()}, indent=1) + "\n"
            for path in paths:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)

    best = time_survivors(fwd, bwd, out / "gluon_record.json", progress=write_tuned)
    write_tuned(best)
    print(f"gluon defaults: {best} -> {', '.join(map(str, paths))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
