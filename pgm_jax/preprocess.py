"""`python -m pgm_jax.preprocess`: corpus -> packed ArrayRecord blocks.

The entry point of `pgm_jax.data.preprocess` (see there for the flags); kept at this
name so that launch scripts and docs need not change.
"""
from pgm_jax.data.preprocess import main

if __name__ == "__main__":
  main()
