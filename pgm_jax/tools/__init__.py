"""Tools: programs built on the library, at the top of the package (only `main` is above).

plan.py            --mode=plan: compile (not run) the train step / samplers for a TPU slice
bench.py           --mode=bench: sampling throughput and FLOPs, train-step speed (text)
bench_images.py    --mode=bench for image configs: PGM vs MaskGIT
convert.py         python -m pgm_jax.tools.convert: the authors' PyTorch checkpoints -> Orbax
preprocess.py      python -m pgm_jax.tools.preprocess: corpus -> packed ArrayRecord blocks
imagenet_codes.py  images -> VQ-8 code records (preprocess --tokenizer=vq_ds8)
tokenizers.py      python -m pgm_jax.tools.tokenizers: train a SentencePiece model
vq.py              python -m pgm_jax.tools.vq: LlamaGen's VQ-8 .pt -> .npz
eval_assets.py     python -m pgm_jax.tools.eval_assets: GPT-2 judge, FID Inception, FID stats
"""


def with_tool_configs(config):
  """`config` (an experiment config) plus the sections of the tools that run on it, each
  with its tool's defaults: `config.plan` (tools/plan.py), `config.bench` (tools/bench.py;
  image configs get the image bench's keys) and `config.harness` (evaluation/harness.py).
  Every config file ends with it, so `--config.plan.topology=...` and the like work on any
  config; the experiment's own sections stay in `pgm_jax.core.config_lib`."""
  # pylint: disable=g-import-not-at-top
  from pgm_jax import families
  from pgm_jax.evaluation import harness
  from pgm_jax.tools import bench, plan
  # pylint: enable=g-import-not-at-top
  config.plan = plan.config_defaults()
  config.bench = bench.config_defaults(images=families.of(config).is_image)
  config.harness = harness.config_defaults()
  return config
