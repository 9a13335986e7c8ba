"""pgm_jax: Partition Generative Models in JAX/Flax.

The pins are the set that installs together on CPython 3.11 (checked 2026-11-28);
see docs/ and README.md. TensorFlow is deliberately not a dependency: metrics are
written as TensorBoard event files with tensorboardX, and TFDS is read through
its TF-free ArrayRecord `data_source` path.

`pip install -e .` installs what training, eval, sampling and the benches need (the
README's first command); TFDS sources (LM1B, `preprocess --source=tfds:...`), the test
suite, lm-evaluation-harness, the TPU compiler and PyTorch checkpoint import are extras.
"""
import setuptools

INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "ml_collections==1.1.0",
    "array_record==0.8.6",
    "sentencepiece==0.2.3",
    "clu==0.0.12",
    "numpy==2.4.6",
    "tiktoken==0.14.0",
    "tensorboardX==2.6.5",
    "absl-py==2.5.1",
    # Images: decoding/resizing for the ImageNet codes and FID reference statistics, PNGs.
    "pillow==13.0.0",
    # Reading .safetensors checkpoints (`pgm_jax.tools.convert`, the GPT-2 judge) without
    # torch; bf16 tensors come back as ml_dtypes.bfloat16 (ml_dtypes comes with jax).
    "safetensors==0.8.0",
]

# TFDS datasets (config.data.name=lm1b, zero-shot sets prepared with TFDS, preprocess
# --source=tfds:...), read through the TF-free `tfds.data_source` (it pulls pyarrow).
DATA = ["tensorflow-datasets==4.9.10"]
# lm-evaluation-harness for `--mode=harness` (no torch needed: pgm_jax scores the requests).
HARNESS = ["lm-eval==0.4.13"]
# `hf:OWNER/REPO/FILE` sources of convert, vq and convert_gpt2 (pgm_jax/io/hub.py): the
# authors' released checkpoints, the VQ-8 and the GPT-2 judge, through the Hub's own cache.
HUB = ["huggingface_hub==2.4.0"]

EXTRAS_REQUIRE = {
    # torch (CPU wheel) builds reference checkpoints in tests/test_convert.py; huggingface_hub
    # reads the hub cache tests/test_hub.py builds (offline);
    # matplotlib runs the Colab notebook's plotting cell in tests/test_notebook.py; the
    # data and harness extras are exercised by their tests.
    "test": ["pytest==9.2.0", "pytest-xdist==3.8.0", "torch==2.13.0",
             "matplotlib==3.10.8"] + DATA + HARNESS + HUB,
    "data": DATA,
    "harness": HARNESS,
    "hub": HUB,
    # The notebook's released-models section downloads from the Hub; its .ckpt pickles are
    # read with the torch a Colab runtime already has (else: pip install 'pgm_jax[convert]').
    "notebook": ["matplotlib==3.10.8"] + HUB,
    # What `pip install "jax[tpu]==0.10.2"` pulls (checked with pip --dry-run, 2026-11-29):
    # jaxlib==0.10.2 (already pinned above), libtpu 0.0.42.1 (about 137 MB) and requests.
    # On a TPU VM this is the runtime; on any Linux x86-64 machine libtpu is also the TPU
    # *compiler*: `--mode=plan --config.plan.topology=v5e-16` (pgm_jax/plan.py) and
    # tests/test_plan.py compile for real TPU slices without one.
    "tpu": ["jax[tpu]==0.10.2", "libtpu==0.0.42.1", "requests==2.34.2"],
    # `python -m pgm_jax.tools.convert` on pickled PyTorch checkpoints (.ckpt/.pt) needs torch;
    # .safetensors files need neither. So do the one-time conversions of the VQ tokenizer
    # (`python -m pgm_jax.tools.vq`) and of the FID Inception weights (`convert_inception`).
    "convert": ["torch==2.13.0"],
}

setuptools.setup(
    name="pgm_jax",
    version="0.1.0",
    description="Partition Generative Models (PGM), MDLM and baselines in JAX/Flax.",
    packages=setuptools.find_packages(include=["pgm_jax", "pgm_jax.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
