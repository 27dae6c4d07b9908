"""Dispatch from measurements (fastattn.backends.dispatch) on synthetic tables: the measured
ranking wins, a declining backend passes to the next, nearby length buckets share a ranking,
the machine's own table overrides the shipped one, torch.compile sees the same choice, and
fastattn.explain says why. Also the sweep's table from a benchmark record."""
import json

import pytest
import torch

import fastattn
from fastattn import backends
from fastattn.backends import dispatch
from fastattn.backends.base import length_bucket
from fastattn.front_door import describe
from fastattn.bench import dispatch_sweep as sweep
from helpers import count_fastattn_nodes

MACHINE = dispatch.machine("cpu")


@pytest.fixture
def table(monkeypatch, tmp_path):
    """Installs a synthetic table for this CPU, with the dispatch answers forgotten around it."""
    monkeypatch.setenv("FASTATTN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(dispatch, "_TABLES", {})
    monkeypatch.setattr(backends, "_CHOSEN", {})

    def install(entries: dict[str, list[str]]):
        dispatch._TABLES[MACHINE] = dispatch.Table(entries)
        backends._CHOSEN.clear()
    return install


def chosen(q, **kw):
    return backends.select_backend("auto", describe(q, q, q, key_padding_mask=kw.get("key_padding_mask"),
                                                    causal=kw.get("causal", False))[1])


def test_length_bucket():
    assert [length_bucket(n) for n in (0, 1, 2, 3, 64, 65, 4096)] == [0, 1, 2, 4, 64, 128, 4096]


def test_the_measured_ranking_wins_and_decliners_pass(table):
    q = torch.randn(1, 2, 40, 32)
    assert chosen(q).name == "cpu"  # no table: the registry's order
    table({"fp32|d32|dense|full|fwd|n64": ["sdpa", "cpu"], "fp32|d32|padded|full|fwd|n64": ["sdpa", "cpu"]})
    assert chosen(q).name == "sdpa"
    assert chosen(q, causal=True).name == "cpu"  # another case: no entry
    assert chosen(q, key_padding_mask=torch.zeros(1, 40, dtype=torch.bool)).name == "cpu"  # sdpa declines
    torch.testing.assert_close(fastattn.attention(q, q, q), fastattn.attention(q, q, q, backend="cpu"))


def test_nearby_buckets_share_a_ranking(table):
    table({"fp32|d32|dense|full|fwd|n256": ["sdpa", "cpu"]})
    assert chosen(torch.randn(1, 2, 64, 32)).name == "sdpa"  # two octaves away
    assert chosen(torch.randn(1, 2, 32, 32)).name == "cpu"  # three


def test_the_machines_table_overrides_the_shipped_one(table, tmp_path, monkeypatch):
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    key = "fp32|d32|dense|full|fwd|n64"
    (shipped / f"{MACHINE}.json").write_text(json.dumps({"entries": {key: {"order": ["sdpa", "cpu"]},
                                                                     "fp32|d32|dense|causal|fwd|n64": {"order": ["sdpa"]}}}))
    (tmp_path / f"dispatch-{MACHINE}.json").write_text(json.dumps({"entries": {key: {"order": ["cpu", "sdpa"]}}}))
    monkeypatch.setattr(dispatch, "SHIPPED", shipped)
    assert dispatch.table(MACHINE).entries == {key: ["cpu", "sdpa"], "fp32|d32|dense|causal|fwd|n64": ["sdpa"]}


def test_compile_takes_the_same_backend(table):
    table({"fp32|d32|dense|full|fwd|n64": ["sdpa", "cpu"]})
    q = torch.randn(1, 2, 40, 32)

    def f(q):
        return fastattn.attention(q, q, q)

    assert count_fastattn_nodes(f, q) == 1
    seen = []
    real = backends.REGISTRY["sdpa"].forward

    def spy(*args):
        seen.append("sdpa")
        return real(*args)

    backends.REGISTRY["sdpa"].forward = spy
    try:
        torch.compile(f, fullgraph=True, backend="aot_eager")(q)
    finally:
        del backends.REGISTRY["sdpa"].forward
    assert seen == ["sdpa"]


def test_dynamic_shapes_compile_once_per_length_bucket(table):
    """Symbolic sizes and floats become the table's plain values by guarded comparisons."""
    from torch._dynamo.testing import CompileCounter

    table({"fp32|d32|gqa|causal|fwd|n64": ["sdpa", "cpu"]})
    torch._dynamo.reset()
    counter = CompileCounter()
    f = lambda q, k: fastattn.attention(q, k, k, causal=True)  # noqa: E731
    compiled = torch.compile(f, dynamic=True, fullgraph=True, backend=counter)
    for n in (40, 50, 60, 70, 200):
        q, k = torch.randn(1, 4, n, 32), torch.randn(1, 2, n, 32)
        torch.testing.assert_close(compiled(q, k), f(q, k))
    assert counter.frame_count == 3  # buckets 64, 128, 256


def test_explain(table):
    q = torch.randn(1, 2, 40, 32)
    table({"fp32|d32|dense|full|fwd|n64": ["sdpa", "cpu"]})
    text = fastattn.explain(q, q, q)
    assert f"{MACHINE} table, case fp32|d32|dense|full|fwd|n64): sdpa, cpu" in text and text.endswith("-> sdpa")
    text = fastattn.explain(q, q, q, key_padding_mask=torch.zeros(1, 40, dtype=torch.bool), backend="sdpa")
    assert "sdpa: declines: a padding mask" in text and "NoBackendError" in text
    with pytest.raises(ValueError, match="backend"):
        fastattn.explain(q, q, q, backend="nope")


def test_table_from_a_record_before_the_sdpa_backend():
    """The H200 record of 2026-11-26 had no fastattn:sdpa rows: the torch kernel it runs stands in."""
    case = dict(kind="dense", mode="fwd", dtype="bf16", batch=4, heads=16, kv_heads=16, seq=4096, head_dim=128)
    rows = [dict(case="dense", backend=b, ms=ms, **case) for b, ms in
            (("fastattn:triton", 1.24), ("fastattn:cuda", 3.17), ("fastattn:auto", 1.24), ("sdpa:cudnn", 0.94),
             ("sdpa:flash", 1.62))]
    padded = dict(case, kind="padded")
    rows += [dict(case="padded", backend=b, ms=ms, **padded) for b, ms in
             (("fastattn:triton", 0.85), ("fastattn:cuda", 2.02), ("sdpa:cudnn", 1.35))]
    entries = sweep.table_entries(rows, "cuda")
    assert entries["bf16|d128|dense|full|fwd|n4096"]["order"] == ["sdpa", "triton", "cuda"]
    assert entries["bf16|d128|dense|full|fwd|n4096"]["ms"]["sdpa"] == 0.94  # cuDNN's
    assert entries["bf16|d128|padded|full|fwd|n4096"]["order"] == ["triton", "cuda"]  # sdpa declines padding


def test_noise_does_not_overturn_the_default_order():
    assert sweep.ranked({"sdpa": 1.00, "cpu": 1.02}, 0.03) == ["cpu", "sdpa"]
    assert sweep.ranked({"sdpa": 1.00, "cpu": 1.10}, 0.03) == ["sdpa", "cpu"]
    assert sweep.ranked({"sdpa": 1.00, "cpu": 1.08}, sweep.MARGIN["cpu"]) == ["cpu", "sdpa"]


def test_sweep_writes_this_machines_table(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep, "grid", lambda device, quick: [sweep.Case("dense", "fwd", "fp32", 1, 2, 2, 64, 16)])
    out = tmp_path / "table.json"
    assert sweep.main(["--dispatch", "--device", "cpu", "--min-run-time", "0.01", "--out", str(out)]) == 0
    written = json.loads(out.read_text())
    assert written["machine"] == MACHINE
    assert set(written["entries"]["fp32|d16|dense|full|fwd|n64"]["order"]) == {"cpu", "sdpa"}
