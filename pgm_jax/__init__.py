"""pgm_jax: Partition Generative Models (PGM), MDLM and baselines in JAX/Flax."""
import pathlib

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
__version__ = "0.1.0"
