"""Drop-in modules: MultiHeadAttention (an nn.MultiheadAttention on fastattn) and
replace_attention (swaps it into an existing model)."""
from .multihead_attention import MultiHeadAttention
from .replace import replace_attention

__all__ = ["MultiHeadAttention", "replace_attention"]
