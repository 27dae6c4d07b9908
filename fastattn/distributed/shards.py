"""Which positions of a sequence each rank holds: contiguous (rank r: [r N/W, (r + 1) N/W)) or
zigzag (2W chunks; rank r: chunks r and 2W - 1 - r, which balances causal work)."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

LAYOUTS = ("zigzag", "contiguous")


def group_of(group) -> tuple[int, int]:
    """(this rank's index in group, the group's size); torch.distributed must be initialised."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("fastattn.distributed: torch.distributed is not initialised "
                           "(torch.distributed.init_process_group, or torchrun)")
    return dist.get_rank(group), dist.get_world_size(group)


def check_layout(layout) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")


def _chunks(layout: str, rank: int, world: int) -> tuple[int, list[int]]:
    """(chunks the sequence is cut into, the ones `rank` holds, in order)."""
    return (world, [rank]) if layout == "contiguous" else (2 * world, [rank, 2 * world - 1 - rank])


def shard(x: Tensor, dim: int, group=None, layout: str = "zigzag") -> Tensor:
    """This rank's part of x, a whole sequence along dim (N positions, N divisible by the chunk count)."""
    check_layout(layout)
    rank, world = group_of(group)
    count, mine = _chunks(layout, rank, world)
    if x.shape[dim] % count:
        raise ValueError(f"x: expected a length along dim {dim} divisible by {count} ({layout} over {world} ranks), "
                         f"got {x.shape[dim]}")
    parts = x.chunk(count, dim)
    return torch.cat([parts[c] for c in mine], dim)


def unshard(x_local: Tensor, dim: int, group=None, layout: str = "zigzag") -> Tensor:
    """The whole sequence from every rank's part (an all-gather; differentiable: each part's
    gradient goes back to its rank)."""
    check_layout(layout)
    rank, world = group_of(group)
    count, _ = _chunks(layout, rank, world)
    if x_local.shape[dim] % (count // world):
        raise ValueError(f"x_local: expected a length along dim {dim} divisible by {count // world}, "
                         f"got {x_local.shape[dim]}")
    gathered = _Gather.apply(x_local.contiguous(), group, rank, world)
    chunks = [None] * count
    for r, part in enumerate(gathered):
        for c, piece in zip(_chunks(layout, r, world)[1], part.chunk(count // world, dim)):
            chunks[c] = piece
    return torch.cat(chunks, dim)


class _Gather(torch.autograd.Function):
    """Every rank's x stacked (W, ...); the backward sums each part's gradient over the ranks
    (an all-reduce: gloo has no reduce-scatter) and keeps this rank's."""

    @staticmethod
    def forward(ctx, x, group, rank, world):
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x, group=group)
        ctx.group, ctx.rank = group, rank
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank], None, None, None
