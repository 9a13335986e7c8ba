"""Attention and other ops shared by the models.

masks.py           AttentionMask (structured mask kinds)
target.py          compile_target / target_platform (platform the kernels are built for)
attention.py       partition_attention: the one attention op (XLA reference + dispatch)
pallas_attention.py  the block-sparse Pallas kernel (Mosaic on TPU, Triton on GPU)
partition_layout.py  sort_by_group / permute (the sorted layout)
"""
from pgm_jax.ops.attention import partition_attention, resolve_impl
from pgm_jax.ops.masks import AttentionMask
from pgm_jax.ops.partition_layout import SortedLayout, permute, sort_by_group
from pgm_jax.ops.target import compile_target, target_platform

__all__ = ["AttentionMask", "compile_target", "partition_attention", "resolve_impl",
           "target_platform", "SortedLayout", "permute", "sort_by_group"]
