"""Ring attention: each rank keeps its queries while the ranks' keys and values go around the ring,
the next block's transfer overlapping the current block's kernel; partial results merge by their
lse in float32. The backward reruns the ring with the global out and lse (each block's kernel
backward then gives exactly its share), and the keys' and values' gradients travel with them,
ring-flash-attention's design: one more hop brings each to its owner."""
from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch import Tensor

from .. import ops
from ..api import check_qkv
from ..backends import select_backend
from ..call import Call
from ..front_door import describe
from ..masks import key_ranges
from ..merge import merge_attention
from .shards import check_layout, group_of


def _block(layout: str, causal: bool, rank: int, src: int, n: int):
    """(query rows, key rows, causal) of rank's queries against src's keys, or None where no
    query sees any of them. Zigzag: rank r holds chunks r and 2W-1-r, so keys of an earlier rank
    are seen whole by all queries in their first chunk only, and a later rank's keys by the second
    chunk of queries only."""
    whole = slice(None)
    if not causal:
        return whole, whole, False
    if src == rank:
        return whole, whole, True  # the local positions are in order: top-left causal is exact
    if layout == "contiguous":
        return (whole, whole, False) if src < rank else None
    half = n // 2
    return (whole, slice(0, half), False) if src < rank else (slice(half, None), whole, False)


class Ring:
    """Point-to-point exchange with this rank's neighbours: send to next, receive from previous."""

    def __init__(self, group, rank: int, world: int):
        def global_rank(r):
            return r if group is None else dist.get_global_rank(group, r)

        self.group, self.next, self.prev = group, global_rank((rank + 1) % world), global_rank((rank - 1) % world)

    def start(self, tensors: list[Tensor]) -> tuple[list, list[Tensor]]:
        """Sends tensors on and receives the previous rank's (same shapes): (requests, received).
        Point-to-point sends take contiguous tensors: a strided one (q, k, v as views of one
        projection) is copied once, at the first step."""
        tensors = [t.contiguous() for t in tensors]
        received = [torch.empty_like(t) for t in tensors]
        p2p = [dist.P2POp(dist.isend, t, self.next, self.group) for t in tensors]
        p2p += [dist.P2POp(dist.irecv, t, self.prev, self.group) for t in received]
        return (dist.batch_isend_irecv(p2p) if p2p else []), received


class Waits:
    """The seconds this process has waited on the ring's transfers: the communication its compute
    did not hide (the benchmark reads and resets `seconds`)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def wait(self, requests) -> None:
        began = time.perf_counter()
        for request in requests:
            request.wait()
        self.seconds += time.perf_counter() - began


WAITS = Waits()


def _held(k: Tensor, v: Tensor, padding: Tensor | None) -> list[Tensor]:
    """What goes around the ring: k, v and the padding as bytes (gloo sends no bools)."""
    return [k, v] + ([padding.view(torch.uint8)] if padding is not None else [])


def _keys(held: list[Tensor], keys: slice) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """A held block's k, v, padding (bool, a view) and its kernel form, over the key rows `keys`."""
    padding = held[2][:, keys].view(torch.bool) if len(held) > 2 else None
    return held[0][:, :, keys], held[1][:, :, keys], padding, None if padding is None else key_ranges(padding)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, padding, group, causal, scale, layout, backend):
        rank, world = group_of(group)
        ring, n = Ring(group, rank, world), q.shape[2]
        out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        lse = torch.full(q.shape[:3], float("-inf"), dtype=torch.float32, device=q.device)
        held = _held(k, v, padding)
        for step in range(world):
            requests, arriving = ring.start(held) if step < world - 1 else ([], held)
            block = _block(layout, causal, rank, (rank - step) % world, n)
            if block is not None:
                rows, keys, block_causal = block
                bk, bv, kpm, ranges = _keys(held, keys)
                o, l = ops.attention_forward(q[:, :, rows], bk, bv, backend, Call(
                    key_padding=kpm, key_ranges=ranges, causal=block_causal, scale=scale))
                out[:, :, rows], lse[:, :, rows] = merge_attention(out[:, :, rows], lse[:, :, rows], o, l)
            WAITS.wait(requests)
            held = arriving
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, padding, out, lse)
        ctx.setup = (group, causal, scale, layout, backend)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, padding, out, lse = ctx.saved_tensors
        group, causal, scale, layout, backend = ctx.setup
        rank, world = group_of(group)
        ring, n = Ring(group, rank, world), q.shape[2]
        if dout is None:
            dout = torch.zeros_like(out)
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        held = _held(k, v, padding)
        grads = None  # dK, dV (float32) of the block held, summed over the ranks it has visited
        for step in range(world):
            # the blocks' keys on, and the gradients finished at the step before (for the block this rank now holds)
            kv_requests, arriving = ring.start(held) if step < world - 1 else ([], held)
            grad_requests, grads_in = ring.start(grads) if grads is not None else ([], None)
            block, done = _block(layout, causal, rank, (rank - step) % world, n), None
            if block is not None:
                rows, keys, block_causal = block
                bk, bv, kpm, ranges = _keys(held, keys)
                lse_rows = lse[:, :, rows].contiguous()
                dlse_rows = None if dlse is None else dlse[:, :, rows].contiguous()
                dq_block, dk_block, dv_block = ops.attention_backward(
                    dout[:, :, rows], dlse_rows, q[:, :, rows], bk, bv, out[:, :, rows], lse_rows, backend,
                    Call(key_padding=kpm, key_ranges=ranges, causal=block_causal, scale=scale))
                dq[:, :, rows] += dq_block
                done = keys, dk_block, dv_block
            WAITS.wait(kv_requests + grad_requests)
            grads = grads_in or [torch.zeros(t.shape, dtype=torch.float32, device=t.device) for t in (k, v)]
            if done is not None:  # this rank's share, added to what the block gathered before
                keys, dk_block, dv_block = done
                grads[0][:, :, keys] += dk_block
                grads[1][:, :, keys] += dv_block
            held = arriving
        requests, own = ring.start(grads) if world > 1 else ([], grads)  # the last hop: each block's to its owner
        WAITS.wait(requests)
        dk, dv = (g.to(t.dtype) for g, t in zip(own, (k, v)))
        return dq.to(q.dtype), dk, dv, None, None, None, None, None, None


def ring_attention(q: Tensor, k: Tensor, v: Tensor, *, group=None, causal: bool = False, scale: float | None = None,
                   key_padding_mask: Tensor | None = None, layout: str = "zigzag", return_lse: bool = False,
                   backend: str = "auto"):
    """This rank's shard of fastattn.attention over a sequence split along its length over group
    (W ranks, fastattn.distributed.shard's layout): q (B, H, n, D), k and v (B, Hkv, n, D) and
    key_padding_mask (B, n) (True = ignore) are this rank's shards. Forward and backward
    (gradients of q, k, v) equal one process's call on the whole sequence, up to the order of
    floating-point sums; causal blocks no query sees are skipped; a row that sees no key is zeros
    (lse -inf). Returns out (B, H, n, D), or (out, lse) with lse (B, H, n) float32."""
    check_layout(layout)
    _, world = group_of(group)
    if not (q.shape[2] == k.shape[2] == v.shape[2]):
        raise ValueError(f"k, v: expected this rank's shard of the sequence q holds ({q.shape[2]} positions), got "
                         f"{k.shape[2]} and {v.shape[2]}")
    if layout == "zigzag" and causal and world > 1 and q.shape[2] % 2:
        raise ValueError(f"q: a zigzag shard holds two equal chunks, expected an even length, got {q.shape[2]}")
    check_qkv(q, k, v)
    call, problem = describe(q, k, v, key_padding_mask=key_padding_mask, causal=causal, scale=scale,
                             return_lse=return_lse, backend=backend)
    out, lse = _RingAttention.apply(q, k, v, call.key_padding, group, causal, call.scale, layout,
                                    select_backend(backend, problem).name)
    return (out, lse) if return_lse else out
