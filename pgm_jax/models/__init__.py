"""Models: text (the MDLM DiT baseline, its causal AR variant, the PartitionDiT), images
(the class-conditional PartitionDiT with registers, the MaskGIT baseline), and the
networks evaluation and data preparation run (GPT-2 judge, FID Inception, VQ-8).

Which model a config builds is its family's business: `pgm_jax.families`.
"""
from pgm_jax.models.dit import DiT
from pgm_jax.models.layers import ModelConfig, remat_policy
from pgm_jax.models.maskgit import MaskGIT
from pgm_jax.models.pgm import QUERY_MODES, PartitionDiT
from pgm_jax.models.pgm_image import ImagePartitionDiT

__all__ = ["DiT", "PartitionDiT", "ImagePartitionDiT", "MaskGIT", "ModelConfig", "QUERY_MODES",
           "remat_policy"]
