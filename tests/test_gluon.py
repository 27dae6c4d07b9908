"""The Gluon Hopper forward (fastattn/gluon): its TMA view of the storage and the isolated checks
of benchmarks/gluon_check.py everywhere (a stand-in child for the kernel: no interpreter runs
Gluon); on an sm_90 GPU each variant against float64 in its own process. Its compile report
runs with the Triton one (test_triton.py, `python -m fastattn report --check`)."""
import sys
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


def test_isolated_checks_report_passes_failures_and_hangs(tmp_path):
    """The plumbing of the GPU step, with stand-in children: one passes, one fails, one hangs."""
    children = {launch.VARIANTS[0]: "print('ok')", launch.VARIANTS[1]: "raise SystemExit('wrong')",
                launch.VARIANTS[2]: "import time; time.sleep(60)"}
    out = tmp_path / "checks.jsonl"
    passed = gluon_check.check_variants(list(children), out, timeout_s=3,
                                        command=lambda v: [sys.executable, "-c", children[v]])
    assert passed == [launch.VARIANTS[0]]
    lines = out.read_text().splitlines()
    assert [__import__("json").loads(x)["status"] for x in lines] == ["ok", "failed", "timed out"]


@pytest.mark.skipif(not HOPPER, reason="needs an sm_90 GPU (no interpreter runs Gluon)")
@pytest.mark.parametrize("variant", launch.VARIANTS, ids=lambda v: v.name)
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
