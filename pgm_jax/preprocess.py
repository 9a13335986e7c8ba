"""Moved: `python -m pgm_jax.preprocess` is now `python -m pgm_jax.tools.preprocess`."""
import sys

_MOVED = ("pgm_jax.preprocess: error: this command moved; run python -m pgm_jax.tools.preprocess "
          "(docs/layout.md)")
if __name__ == "__main__":
  sys.exit(_MOVED)
raise ImportError(_MOVED)
