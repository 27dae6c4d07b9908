"""Context parallelism (fastattn.distributed) on 2 and 3 gloo processes against one process's
fastattn.attention on the whole sequence; fastattn.merge_attention on its own."""
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import TOL, rel_err

import fastattn
from fastattn import distributed as fd

# Both layouts, causal or not; MHA unpadded and GQA with key padding (a batch row whose first keys
# are all padding: under causality its first queries see no key).
CASES = [dict(layout=layout, causal=causal, Hkv=Hkv, padding=padding, dtype=torch.float32)
         for layout in fd.LAYOUTS for causal in (False, True) for Hkv, padding in ((4, False), (2, True))]
CASES.append(dict(layout="zigzag", causal=True, Hkv=2, padding=True, dtype=torch.bfloat16))


def whole_problem(case, world):
    """The same whole sequence on every rank: q, k, v, padding, and the gradients to pull back."""
    gen = torch.Generator().manual_seed(7)
    B, H, D, N = 2, 4, 16, 2 * world * 5
    q = torch.randn(B, H, N, D, generator=gen).to(case["dtype"])
    k, v = (torch.randn(B, case["Hkv"], N, D, generator=gen).to(case["dtype"]) for _ in range(2))
    padding = None
    if case["padding"]:
        padding = torch.rand(B, N, generator=gen) < 0.3
        padding[1, :7] = True
    dout, dlse = torch.randn(B, H, N, D, generator=gen).to(case["dtype"]), torch.randn(B, H, N, generator=gen)
    return q, k, v, padding, dout, dlse


def finite(lse):
    return torch.where(torch.isfinite(lse), lse, 0.0)


def check_against_one_process(case, world):
    q, k, v, padding, dout, dlse = whole_problem(case, world)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    want, want_lse = fastattn.attention(*leaves, key_padding_mask=padding, causal=case["causal"], return_lse=True)
    want_grads = torch.autograd.grad((want * dout).sum() + (finite(want_lse) * dlse).sum(), leaves)

    layout = case["layout"]
    local = [fd.shard(t, 2, layout=layout).requires_grad_() for t in (q, k, v)]
    local_padding = None if padding is None else fd.shard(padding, 1, layout=layout)
    out, lse = fd.ring_attention(*local, causal=case["causal"], key_padding_mask=local_padding, layout=layout,
                                 return_lse=True)
    loss = (out * fd.shard(dout, 2, layout=layout)).sum() + (finite(lse) * fd.shard(dlse, 2, layout=layout)).sum()
    grads = torch.autograd.grad(loss, local)
    tol = TOL[case["dtype"]]
    assert rel_err(out, fd.shard(want, 2, layout=layout)) < tol, case
    assert torch.equal(torch.isinf(lse), torch.isinf(fd.shard(want_lse, 2, layout=layout))), case
    assert rel_err(finite(lse), finite(fd.shard(want_lse, 2, layout=layout))) < 1e-5, case
    if padding is not None and case["causal"]:
        assert torch.isinf(want_lse).any()  # rows that see no key: zeros
        assert not out.float()[torch.isinf(lse)].any()
    for name, got, w in zip("qkv", grads, want_grads):
        assert rel_err(got, fd.shard(w, 2, layout=layout)) < 4 * tol, (name, case)
    assert rel_err(fd.unshard(out.detach(), 2, layout=layout), want) < tol  # the whole, gathered


def check_bad_input(world):
    x = torch.randn(2, 4, 2 * world * 3 + 1, 8)
    with pytest.raises(ValueError, match="divisible by"):
        fd.shard(x, 2)
    with pytest.raises(ValueError, match="layout: expected one of"):
        fd.shard(x, 2, layout="striped")
    q = torch.randn(1, 2, 6, 8)
    with pytest.raises(ValueError, match="expected this rank's shard"):
        fd.ring_attention(q, q[:, :, :4], q[:, :, :4])
    with pytest.raises(ValueError, match="expected an even length"):
        fd.ring_attention(q[:, :, :5], q[:, :, :5], q[:, :, :5], causal=True)
    whole = torch.arange(2 * world * 4.0).view(1, 1, -1, 1)
    for layout in fd.LAYOUTS:  # round trips
        part = fd.shard(whole, 2, layout=layout)
        assert part.shape[2] == 8 and torch.equal(fd.unshard(part, 2, layout=layout), whole)
    assert fd.shard(whole, 2, layout="zigzag")[0, 0, :, 0].tolist()[:4] == [4.0 * dist.get_rank() + i for i in range(4)]


def worker(rank, world, init):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        for case in CASES:
            check_against_one_process(case, world)
        check_bad_input(world)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_ring_attention_equals_one_process(tmp_path, world):
    mp.spawn(worker, args=(world, f"file://{tmp_path / 'rendezvous'}"), nprocs=world)


def test_without_torch_distributed_a_clear_error():
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        fd.shard(torch.zeros(4), 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_merge_attention_of_two_key_sets_is_attention_over_both(dtype):
    torch.manual_seed(0)
    q = torch.randn(2, 4, 9, 16).to(dtype).requires_grad_()
    k, v = (torch.randn(2, 2, 30, 16).to(dtype).requires_grad_() for _ in range(2))
    padding = torch.rand(2, 30) < 0.3
    padding[1] = True  # a batch row with no key at all: zeros, lse -inf
    want, want_lse = fastattn.attention(q, k, v, key_padding_mask=padding, return_lse=True)
    parts = [fastattn.attention(q, k[:, :, s], v[:, :, s], key_padding_mask=padding[:, s], return_lse=True)
             for s in (slice(0, 11), slice(11, None))]
    out, lse = fastattn.merge_attention(*parts[0], *parts[1])
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert rel_err(out, want) < TOL[dtype] and not out[1].any()
    assert torch.equal(torch.isinf(lse), torch.isinf(want_lse)) and torch.isinf(lse[1]).all()
    assert rel_err(finite(lse), finite(want_lse)) < 1e-5
    dout = torch.randn_like(want)
    got = torch.autograd.grad((out * dout).sum(), (q, k, v))
    for g, w in zip(got, torch.autograd.grad((want * dout).sum(), (q, k, v))):
        assert torch.isfinite(g).all() and rel_err(g, w) < 4 * TOL[dtype]


def test_merge_attention_bad_input():
    out, lse = torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3)
    with pytest.raises(ValueError, match=r"out_b: expected \(B, H, N, D\) with its lse"):
        fastattn.merge_attention(out, lse, out, lse[..., :2])
    with pytest.raises(TypeError, match="lse of out_a: expected a torch.Tensor, got list"):
        fastattn.merge_attention(out, [0.0], out, lse)
    with pytest.raises(ValueError, match="lse of out_b: expected device cpu"):
        fastattn.merge_attention(out, lse, out, lse.to("meta"))
    with pytest.raises(TypeError, match="lse of out_a: expected float32"):
        fastattn.merge_attention(out, lse.double(), out, lse)
    with pytest.raises(ValueError, match="out_b: expected the shape of out_a"):
        fastattn.merge_attention(out, lse, out[:, :1], lse[:, :1])
