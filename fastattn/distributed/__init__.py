"""Context parallelism on torch.distributed: a sequence split along its length over a group of
ranks (shard, unshard), and ring attention over it (ring_attention). gloo on CPUs, NCCL on GPUs."""
from .ring import ring_attention
from .shards import LAYOUTS, shard, unshard

__all__ = ["LAYOUTS", "ring_attention", "shard", "unshard"]
