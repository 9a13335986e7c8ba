"""Moved: `python -m pgm_jax.evaluation` is now `python -m pgm_jax.tools.eval_assets`."""
import sys

_MOVED = ("pgm_jax.evaluation: error: this command moved; run python -m "
          "pgm_jax.tools.eval_assets (docs/layout.md)")
if __name__ == "__main__":
  sys.exit(_MOVED)
raise ImportError(_MOVED)
