"""Moved: `python -m pgm_jax.tokenizers` is now `python -m pgm_jax.tools.tokenizers`."""
import sys

_MOVED = ("pgm_jax.tokenizers: error: this command moved; run python -m pgm_jax.tools.tokenizers "
          "(docs/layout.md)")
if __name__ == "__main__":
  sys.exit(_MOVED)
raise ImportError(_MOVED)
