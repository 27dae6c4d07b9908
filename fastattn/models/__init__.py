"""The study notes' Transformer on fastattn (transformer) and its trainer (train:
`python -m fastattn train`)."""
from .transformer import ATTENTION, LMConfig, Packed, Transformer, TransformerConfig, TransformerLM, greedy

__all__ = ["ATTENTION", "LMConfig", "Packed", "Transformer", "TransformerConfig", "TransformerLM", "greedy"]
