"""fastattn: fused scaled-dot-product attention for PyTorch."""
from .api import attention, explain
from .nn import MultiHeadAttention, replace_attention
from .backends import NoBackendError, available_backends, unavailable_backends
from .integrations import register_transformers
from .reference import reference_attention
from .varlen import attention_varlen, pad, unpad
from .kvcache import attention_with_kvcache
from .merge import merge_attention

__version__ = "0.1.0"

__all__ = ["MultiHeadAttention", "NoBackendError", "attention", "attention_varlen", "attention_with_kvcache",
           "available_backends", "explain", "merge_attention", "pad", "reference_attention", "register_transformers", "replace_attention",
           "unavailable_backends", "unpad"]
