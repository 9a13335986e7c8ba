"""Attention and other ops shared by the models."""
from pgm_jax.ops.attention import AttentionMask, partition_attention

__all__ = ["AttentionMask", "partition_attention"]
