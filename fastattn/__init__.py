"""fastattn: fused scaled-dot-product attention for PyTorch."""
from .api import attention
from .backends import NoBackendError, available_backends, unavailable_backends
from .reference import reference_attention

__version__ = "0.1.0"

__all__ = ["NoBackendError", "attention", "available_backends", "reference_attention",
           "unavailable_backends"]
