"""Hopper kernels in Gluon (triton.experimental.gluon): FlashAttention-3's design. See attention.py."""
