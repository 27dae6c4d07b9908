"""The Gluon Hopper kernels (fastattn/gluon): their TMA view of the storage, and the isolated checks
of benchmarks/gluon_check.py everywhere (stand-ins for the kernels: no interpreter runs Gluon);
on an sm_90 GPU each variant, forward and backward, against float64 in its own process. Its compile report
runs with the Triton one (test_triton.py, `python -m fastattn report --check`)."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton.experimental.gluon")
from fastattn.gluon import launch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gluon_check  # noqa: E402

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


@pytest.mark.parametrize("layout", ["bhnd", "bnhd", "packed-qkv"])
def test_storage_rows_find_every_row(layout):
    B, H, N, D = 2, 3, 5, 16
    if layout == "bhnd":
        t = torch.randn(B, H, N, D)
    elif layout == "bnhd":
        t = torch.randn(B, N, H, D).transpose(1, 2)
    else:  # k out of a (B, N, 3, H, D) projection
        t = torch.randn(B, N, 3, H, D)[:, :, 1].transpose(1, 2)
    rows = launch.storage_rows(t)
    sb, sh, sm, _ = t.stride()
    for b in range(B):
        for h in range(H):
            row, col = divmod(b * sb + h * sh, sm)
            assert torch.equal(rows[row:row + N, col:col + D], t[b, h])


def test_storage_rows_declines_what_wraps():
    assert launch.storage_rows(torch.randn(2, 3, 16, 5).transpose(-1, -2)) is None  # D strided
    overlapping = torch.randn(2, 64, 40).as_strided((2, 3, 4, 16), (2560, 8, 40, 1))  # heads 8 apart, D 16
    assert launch.storage_rows(overlapping) is None


@pytest.mark.parametrize("layout", ["bhnd", "bnhd"])
def test_storage_rows_declines_rows_between_sequences(layout):
    """A slice of a longer cache leaves rows no sequence owns (maybe never written: NaN) where a
    tile past a sequence's end would read them."""
    cache = torch.randn(2, 3, 10, 16) if layout == "bhnd" else torch.randn(2, 10, 3, 16).transpose(1, 2)
    assert launch.storage_rows(cache) is not None
    assert launch.storage_rows(cache[:, :, :7]) is None
    assert launch.storage_rows(cache[:1, :1, :7]) is not None  # one sequence: nothing lies between


def test_isolated_checks_report_passes_failures_and_hangs(tmp_path):
    """The plumbing of the GPU step, with stand-in children run at once: one passes, one fails,
    one hangs and is killed at the timeout, which bounds the whole step."""
    children = {launch.VARIANTS[0]: "print('ok')", launch.VARIANTS[1]: "raise SystemExit('wrong')",
                launch.BWD_VARIANTS[0]: "import time; time.sleep(60)", launch.BWD_VARIANTS[1]: "print('ok')"}
    out = tmp_path / "checks.jsonl"
    start = time.perf_counter()
    passed = gluon_check.check_variants(list(children), out, timeout_s=3,
                                        command=lambda v: [sys.executable, "-c", children[v]])
    assert time.perf_counter() - start < 10
    assert passed == [launch.VARIANTS[0], launch.BWD_VARIANTS[1]]
    status = {tuple(r["variant"]): r["status"] for r in map(json.loads, out.read_text().splitlines())}
    assert status == {tuple(launch.VARIANTS[0]): "ok", tuple(launch.VARIANTS[1]): "failed",
                      tuple(launch.BWD_VARIANTS[0]): "timed out", tuple(launch.BWD_VARIANTS[1]): "ok"}
    assert "wrong" in out.read_text()


# The check children with fastattn's Triton kernels (interpreted, on the CPU) standing in for the
# Gluon ones: a right kernel passes them, and an output or a gradient 10% off does not.
STANDIN = """
import torch, fastattn.triton.attention as ta
from fastattn.call import Call
from fastattn.gluon import launch
def forward(q, k, v, out, lse, causal, scale, kpm, ranges, variant, programs):
    ta.forward(q, k, v, out, lse, Call(key_padding=kpm, key_ranges=ranges, causal=causal, scale=scale))
    out.mul_(FACTOR)
def backward(dout, q, k, v, out, lse, dq, dk, dv, causal, scale, kpm, ranges, dlse, variant):
    ta.backward(dout, dlse, q, k, v, out, lse, Call(key_padding=kpm, key_ranges=ranges, causal=causal, scale=scale), dq,
                dk, dv)
    dk.mul_(FACTOR)
launch.forward, launch.backward = forward, backward
"""
SMALL = [(2, 2, 1, 40, 64, True, None), (1, 2, 2, 33, 64, False, None), (3, 2, 2, 40, 64, True, "right"),
         (2, 2, 2, 40, 64, False, "scattered")]


@pytest.mark.parametrize("kind", ["fwd", "bwd"])
@pytest.mark.parametrize("factor", [1.0, 1.1])
def test_check_children_pass_a_right_kernel_and_fail_a_wrong_one(kind, factor, tmp_path):
    child, variant = (gluon_check.CHILD, launch.VARIANTS[0]) if kind == "fwd" else (gluon_check.BWD_CHILD,
                                                                                  launch.BWD_VARIANTS[0])
    child = STANDIN.replace("FACTOR", repr(factor)) + child.replace('device="cuda"', 'device="cpu"')
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", child, json.dumps(list(variant)), json.dumps(SMALL)],
                          capture_output=True, text=True, env=env, timeout=300)
    if factor == 1.0:
        assert done.returncode == 0, done.stderr[-2000:]
        assert json.loads(done.stdout.splitlines()[-1])["max_rel_err"] < 1e-2
    else:
        assert done.returncode != 0 and "AssertionError" in done.stderr, done.stderr[-2000:]
        assert kind == "fwd" or "'dk'" in done.stderr


def test_tuned_defaults_name_forward_and_backward_apart(tmp_path, monkeypatch):
    tuned = tmp_path / "tuned.json"
    monkeypatch.setattr(launch, "TUNED", tuned)
    assert launch.default_variant(128) is None and launch.default_variant(128, backward=True) is None
    tuned.write_text(json.dumps({"d128": list(launch.VARIANTS[1]), "bwd_d64": list(launch.BWD_VARIANTS[2])}))
    assert launch.default_variant(128) == launch.VARIANTS[1] and launch.default_variant(64) is None
    assert launch.default_variant(64, backward=True) == launch.BWD_VARIANTS[2]
    assert launch.default_variant(128, backward=True) is None


@pytest.mark.skipif(not HOPPER, reason="needs an sm_90 GPU (no interpreter runs Gluon)")
@pytest.mark.parametrize("variant", launch.VARIANTS + launch.BWD_VARIANTS, ids=lambda v: v.name)
def test_variant_against_float64(variant, tmp_path):
    passed = gluon_check.check_variants([variant], tmp_path / "checks.jsonl", timeout_s=60)
    assert passed == [variant], (tmp_path / "checks.jsonl").read_text()[-1500:]


@pytest.mark.skipif(not HOPPER or launch.default_variant(128) is None,
                    reason="needs an sm_90 GPU and a variant that passed its check there")
def test_backend_matches_the_reference_through_the_op():
    import fastattn
    from helpers import TOL, rel_err

    q, k, v = (torch.randn(2, 300, h, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for h in (8, 2, 2))
    out = fastattn.attention(q, k, v, causal=True, backend="gluon")
    ref = fastattn.reference_attention(q.double(), k.double(), v.double(), None, None, True)[0]
    assert rel_err(out, ref) < TOL[torch.bfloat16]


@pytest.mark.skipif(not HOPPER or launch.default_variant(128, backward=True) is None,
                    reason="needs an sm_90 GPU and a backward variant that passed its check there")
def test_backend_gradients_match_the_reference_through_the_op():
    import fastattn
    from helpers import TOL, rel_err

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 300, h, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
               for h in (8, 2, 2))
    kpm = torch.arange(300, device="cuda")[None, :] >= torch.tensor([[300], [120]], device="cuda")
    out = fastattn.attention(q, k, v, causal=True, key_padding_mask=kpm, backend="gluon")
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = fastattn.reference_attention(qd, kd, vd, kpm, None, True)[0]
    for got, want in zip(grads, torch.autograd.grad(ref, (qd, kd, vd), dout.double())):
        assert rel_err(got, want) < TOL[torch.bfloat16]


def test_declines_masked_calls_whose_hidden_values_would_leak(monkeypatch):
    """The forward does not yet keep a NaN in a value the mask hides out of the output."""
    from fastattn.backends import Problem, gluon
    from fastattn.backends.gluon import GluonBackend

    monkeypatch.setattr(gluon, "_hopper", lambda: True)
    masked = [Problem("cuda", torch.bfloat16, 64, causal=True), Problem("cuda", torch.bfloat16, 64, key_padding=True)]
    for problem in masked:
        assert any("a NaN in a value the mask hides" in why for why in GluonBackend().reasons(problem))
    dense = Problem("cuda", torch.bfloat16, 64)
    assert not any("mask hides" in why for why in GluonBackend().reasons(dense))
