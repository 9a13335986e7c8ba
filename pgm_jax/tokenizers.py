"""`python -m pgm_jax.tokenizers train ...`: train a SentencePiece model.

The entry point of `pgm_jax.data.tokenizers` (see there for the commands); kept at
this name so that launch scripts and docs need not change.
"""
from pgm_jax.data.tokenizers import main

if __name__ == "__main__":
  main()
