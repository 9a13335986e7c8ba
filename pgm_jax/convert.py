"""Moved: `python -m pgm_jax.convert` is now `python -m pgm_jax.tools.convert`."""
import sys

_MOVED = ("pgm_jax.convert: error: this command moved; run python -m pgm_jax.tools.convert "
          "(docs/layout.md)")
if __name__ == "__main__":
  sys.exit(_MOVED)
raise ImportError(_MOVED)
