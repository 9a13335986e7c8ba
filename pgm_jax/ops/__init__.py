"""Attention and other ops shared by the models."""
from pgm_jax.ops.attention import (AttentionMask, compile_target, partition_attention,
                                   resolve_impl, target_platform)
from pgm_jax.ops.partition_layout import SortedLayout, permute, sort_by_group

__all__ = ["AttentionMask", "compile_target", "partition_attention", "resolve_impl",
           "target_platform", "SortedLayout", "permute",
           "sort_by_group"]
