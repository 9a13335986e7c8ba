"""Samplers, one module per model family, and the driver that runs them from a config.

common.py    prompts, categorical draws, the confidence-threshold reveal rule, device
             placement, SampleResult (shared)
pgm.py       PGM: efficient-uniform, efficient-non-uniform, naive, confidence-threshold
mdlm.py      MDLM: ddpm_cache, ddpm, confidence-threshold
ar.py        AR baseline: left to right with a KV cache
pgm_block.py block PGM: blocks left to right with a KV cache, PGM steps inside a block
image.py     images (PGM image model, MaskGIT): halton, confidence; classifier-free guidance
"""
from pgm_jax.samplers.ar import AR_SAMPLERS, ar_sample
from pgm_jax.samplers.common import (THRESHOLD_SAMPLER, TRACE_COUNTS, Prompt, SampleResult,
                                     check_threshold, filtered_log_probs, keyed_gumbel,
                                     keyed_gumbel_argmax, make_prompt, params_mesh_context,
                                     parse_prompt, split_prompt, threshold_log_probs,
                                     threshold_reveal, unconditional_prompt)
from pgm_jax.samplers.image import IMAGE_SAMPLERS, image_sample
from pgm_jax.samplers.mdlm import MDLM_SAMPLERS, mdlm_passes, mdlm_sample
from pgm_jax.samplers.pgm_block import BLOCK_SAMPLERS, block_sample
from pgm_jax.samplers.pgm import (PGM_SAMPLERS, SCHEDULES, make_schedule, pgm_plan, pgm_sample,
                                  random_orders)

__all__ = ["AR_SAMPLERS", "BLOCK_SAMPLERS", "IMAGE_SAMPLERS", "MDLM_SAMPLERS", "PGM_SAMPLERS",
           "SCHEDULES", "THRESHOLD_SAMPLER", "TRACE_COUNTS", "Prompt", "SampleResult",
           "ar_sample", "block_sample", "check_threshold", "filtered_log_probs", "image_sample",
           "keyed_gumbel", "keyed_gumbel_argmax", "make_prompt", "make_schedule", "mdlm_passes",
           "mdlm_sample",
           "params_mesh_context", "parse_prompt", "pgm_plan", "pgm_sample", "random_orders",
           "split_prompt", "threshold_log_probs", "threshold_reveal", "unconditional_prompt"]
