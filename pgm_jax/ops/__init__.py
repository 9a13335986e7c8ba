"""Attention and other ops shared by the models."""
from pgm_jax.ops.attention import AttentionMask, partition_attention, resolve_impl
from pgm_jax.ops.partition_layout import SortedLayout, permute, sort_by_group

__all__ = ["AttentionMask", "partition_attention", "resolve_impl", "SortedLayout", "permute",
           "sort_by_group"]
