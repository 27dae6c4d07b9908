"""The benchmark's machinery on tiny cases: rows carry the record schema, errors are measured,
failures are contained, plots and the GPU check script are well-formed."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastattn
from fastattn.bench import attention, cases, record_report, run, timing
from fastattn.bench.decode import decode_rows
from fastattn.bench.packed import varlen_rows
from fastattn.bench.context_parallel import context_parallel_rows
from fastattn.bench.score_mods import eager_attention, score_mod_rows, window_pairs

SCHEMA = {"backend", "case", "ms", "tflops", "best_peer", "best_peer_ms", "speedup_vs_best_peer"}


@pytest.mark.parametrize("kind, mode", [("causal+padded", "fwd"), ("gqa", "fwd+bwd")])
def test_run_case_rows_follow_the_schema(kind, mode):
    case = cases.Case(kind, mode, "fp32", 2, 4, 2 if kind == "gqa" else 4, 96, 32)
    rows = attention.run_case(case, "cpu", quick=False, min_run_time=0.01)
    names = {r["backend"] for r in rows}
    assert {"fastattn:cpu", "sdpa:default", "sdpa:math", "sdpa:flash"} <= names
    for r in rows:
        assert SCHEMA <= r.keys(), r
        assert "error" not in r, r
        assert r["max_err"] < 1e-5 and r["tflops"] > 0
    ours = next(r for r in rows if r["backend"] == "fastattn:cpu")
    assert ours["best_peer"].startswith("sdpa") and ours["speedup_vs_best_peer"] > 0


def test_flops_count_valid_tokens_only():
    dense = cases.Case("dense", "fwd", "fp32", 4, 8, 8, 2048, 64)
    padded = cases.Case("padded", "fwd", "fp32", 4, 8, 8, 2048, 64)
    assert padded.lengths() == [2048, 1536, 1024, 512]
    assert padded.flops() / dense.flops() == pytest.approx((4 + 2.25 + 1 + 0.25) / 16)
    assert cases.Case("causal", "fwd+bwd", "fp32", 4, 8, 8, 2048, 64).flops() == dense.flops() / 2 * 2.5


def test_a_failing_provider_does_not_stop_the_rest(monkeypatch):
    real = attention.providers

    def with_a_broken_one(*args):
        found = real(*args)
        found["broken"] = lambda q, k, v: 1 / 0
        return found

    monkeypatch.setattr(attention, "providers", with_a_broken_one)
    rows = attention.run_case(cases.Case("dense", "fwd", "fp32", 1, 2, 2, 64, 16), "cpu", True, 0.01)
    broken = next(r for r in rows if r["backend"] == "broken")
    assert broken["error"].startswith("ZeroDivisionError")
    assert all("ms" in r for r in rows if r["backend"] != "broken")


def test_decode_and_varlen_rows_follow_the_schema():
    decode = decode_rows("cpu", False, 0.01, shapes=[(2, 300)])
    varlen = varlen_rows("cpu", False, 0.01, seqs=[96])
    assert {r["backend"] for r in decode} == {"fastattn.attention_with_kvcache", "fastattn.attention (unsplit)",
                                             "sdpa:default"}
    assert len(varlen) == 2 * 2 * 3  # fwd, fwd+bwd; causal or not; three providers
    for r in decode + varlen:
        assert {"backend", "case", "ms", "best_peer", "best_peer_ms", "speedup_vs_best_peer"} <= r.keys(), r
    assert all(r["max_err"] < 1e-5 for r in decode if r["max_err"] is not None)
    assert all(r["tflops"] > 0 for r in varlen)


def test_score_mod_rows_and_their_eager_peer():
    """The eager formula a user would run instead is right (against fastattn's kernel), the pair
    count is the window's, and every provider of every row runs (FlexAttention compiles: seconds)."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 40, 16), torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16)
    sinks = torch.randn(4)
    for kw in (dict(window=8, sinks=sinks), dict(softcap=2.0), dict()):
        want = fastattn.attention(q, k, v, causal=True, window_size=(kw.get("window", 0) - 1, 0),
                                  softcap=kw.get("softcap", 0.0), sinks=kw.get("sinks"))
        torch.testing.assert_close(eager_attention(q, k, v, 0.25, **kw), want, atol=1e-5, rtol=1e-5)
    assert window_pairs(5, 2) == 1 + 2 * 4 and window_pairs(5, 8) == 15
    rows = score_mod_rows("cpu", False, 0.01, seq=128)
    assert {r["backend"] for r in rows} >= {"fastattn (window 32)", "fastattn (full causal)", "sdpa:default (window as a mask)",
                                           "fastattn (softcap)", "eager (softcap)", "fastattn (sinks)", "eager (sinks)"}
    for r in rows:
        assert {"backend", "case", "ms", "tflops", "best_peer", "speedup_vs_best_peer"} <= r.keys(), r
        peers = [p for p in rows if p["case"] == r["case"] and not p["backend"].startswith("fastattn")]
        assert r["best_peer"] == min(peers, key=lambda p: p["ms"])["backend"]  # the fastest alternative


def test_grid_sizes():
    gpu = cases.grid("cuda", quick=False)
    assert all(c.batch * c.seq == 16384 and c.heads * c.head_dim == 2048 for c in gpu)
    assert {c.kind for c in gpu} >= {"dense", "causal", "padded", "heavy-padded", "causal+padded", "gqa"}
    assert {c.mode for c in gpu} == {"fwd", "fwd+bwd"} and {c.dtype for c in gpu} == {"bf16", "fp16"}
    assert len(cases.grid("cpu", quick=True)) <= 7


def test_plot_and_json(tmp_path):
    rows = [dict(backend=b, mode="fwd", dtype="bf16", head_dim=64, kind=k, seq=n, tflops=n / 100)
            for b in ("fastattn:triton", "sdpa:flash") for k in ("dense", "causal") for n in (1024, 4096)]
    rows += [dict(backend="sdpa:default", mode="fwd+bwd", dtype="fp16", head_dim=128, kind="gqa", seq=4096, tflops=5.0),
             dict(backend="broken", mode="fwd", dtype="bf16", head_dim=64, kind="dense", seq=1024, error="x")]
    record = dict(device="test", rows=rows)
    record_report.plot(record, str(tmp_path / "plots.png"))  # lines where N varies, bars where it does not
    assert [p.name for p in tmp_path.iterdir()] == ["plots.png"]
    json.dumps(record)


def test_no_row_passes_the_hardware_peak(monkeypatch, tmp_path):
    """A tiny run end to end: every TFLOPS row of fp32 and bf16 gets its share of the hardware's
    peak, at most 100%; the peak is at least what torch's own fp32 matmul reaches here."""
    tiny = [cases.Case(k, m, dt, 2, 4, 4, 128, 64) for k, m, dt in
            (("dense", "fwd", "fp32"), ("causal+padded", "fwd", "fp32"), ("dense", "fwd", "bf16"),
             ("padded", "fwd+bwd", "fp32"))]
    monkeypatch.setattr(run, "grid", lambda device, quick: tiny)
    monkeypatch.setattr(run, "decode_rows", lambda device, quick, t: decode_rows(device, quick, t, shapes=[(2, 256)]))
    monkeypatch.setattr(run, "varlen_rows", lambda device, quick, t: varlen_rows(device, quick, t, seqs=[128]))
    monkeypatch.setattr(run, "score_mod_rows", lambda device, quick, t: score_mod_rows(device, quick, t, seq=128))
    monkeypatch.setattr(run, "context_parallel_rows",
                        lambda device, quick, t: context_parallel_rows(device, quick, t, seq=128))
    monkeypatch.setattr(run, "module_rows", lambda *args: [])
    record = run.run(quick=True, json_path=str(tmp_path / "record.json"), device="cpu", end_to_end=False)
    timed = [r for r in record["rows"] + record["varlen"] + record["score_mods"] + record["context_parallel"]
             if "tflops" in r]
    ring = record["context_parallel"][0]
    assert ring["backend"].startswith("fastattn ring") and ring["comm_ms"] > 0 and 0 <= ring["hidden_comm_share"] <= 1
    assert len(timed) >= 4 * 2 + 2 * 3 + 3 + 2 + 2 and {r["dtype"] for r in timed} == {"fp32", "bf16"}
    assert all(0 < r["pct_of_peak"] <= 100 for r in timed), [(r["case"], r["backend"], r["pct_of_peak"]) for r in timed]
    assert json.loads((tmp_path / "record.json").read_text())["complete"]
    peak = record["peaks"]["tflops"]
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    matmul = 2 * 1024**3 / timing.measure_ms(lambda: a @ b, "cpu", 0.2) / 1e9
    assert matmul <= peak["fp32"] <= peak["bf16"], (matmul, peak)


def test_small_calls_keep_up_with_torch():
    """A loose guard against collapse, not the goal (the benchmark holds the goals: 2x on
    attention, 1.1x as a module, 1x decoding): each small call at most a few times torch's.
    Before the host path moved to C++ they read 3-9x."""
    from fastattn.bench.calls import call_rows

    rows = call_rows("cpu", quick=True)
    assert len(rows) == 5 and all("error" not in r for r in rows), rows
    floors = {"attention (1, 1, 1, 64)": 4.0, "MultiHeadAttention B1 L8 E64": 2.0}
    for r in rows:
        assert r["ratio"] <= floors.get(r["case"], 3.0), r


def test_gpu_check_script_is_valid_bash():
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)


def test_cuda_goal_step_plumbing(tmp_path, monkeypatch):
    """gpu_check.sh's cuda goal step on fake timings: every goal row, FA2's ratio beside
    fastattn:cuda's, the record rewritten as it goes, and a case fastattn:cuda declines named."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import cuda_goal

    cases = cuda_goal.goal_cases()
    assert {(c.dtype, c.head_dim, c.mode, c.kind) for c in cases} == {
        (dt, D, m, k) for dt in ("bf16", "fp16") for D in (64, 128) for m in ("fwd", "fwd+bwd")
        for k in ("dense", "causal", "padded", "heavy-padded")}
    assert all(c.seq == 4096 and c.heads * c.head_dim == 2048 for c in cases)

    def fake_run_case(case, device, quick, min_run_time, only):
        assert device == "cuda" and only == cuda_goal.PROVIDERS
        rows = [dict(backend="sdpa:flash", case=case.label, ms=2.0), dict(backend="sdpa:cudnn", case=case.label, ms=1.0)]
        if case.kind != "heavy-padded":
            rows.append(dict(backend="fastattn:cuda", case=case.label, ms=1.6, tflops=100.0, best_peer="sdpa:cudnn",
                             speedup_vs_best_peer=1 / 1.6))
        return rows

    monkeypatch.setattr(cuda_goal, "run_case", fake_run_case)
    monkeypatch.setattr(cuda_goal, "environment", lambda device: dict(device="fake"))
    assert cuda_goal.main(str(tmp_path)) == 0
    record = json.loads((tmp_path / "cuda_goal.json").read_text())
    cuda_rows = [r for r in record["rows"] if r["backend"] == "fastattn:cuda"]
    assert len(record["rows"]) == 3 * len(cases) - len(cases) // 4 and len(cuda_rows) == 3 * len(cases) // 4
    assert all(r["vs_fa2"] == 2.0 / 1.6 and r["fa2_ms"] == 2.0 for r in cuda_rows)


def test_run_case_keeps_only_the_providers_named():
    case = cases.Case("dense", "fwd", "fp32", 1, 2, 2, 64, 64)
    rows = attention.run_case(case, "cpu", quick=True, min_run_time=0.01, only=frozenset({"fastattn:auto", "sdpa:default"}))
    assert sorted(r["backend"] for r in rows) == ["fastattn:auto", "sdpa:default"] and all("ms" in r for r in rows)
