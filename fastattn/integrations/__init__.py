"""Integrations with other libraries; each imports its library only when registered."""
from .transformers import register_transformers

__all__ = ["register_transformers"]
