r"""Offline image default: class-conditional PGM (or MaskGIT) on the 8x8 handwritten digits.

No download and no VQ: the 1,797 UCI digits that scikit-learn ships are vendored in
third_party/digits, and the 17 grey levels are the tokens (MASK = 17, BOS = 18; L = 1 + 64).
Every fifth image (360) is held out. The same models, objectives, samplers and guidance as
configs/imagenet.py, at a size that trains in a few minutes on 2 CPU cores.

  python -m pgm_jax.main --config=configs/digits.py:pgm --workdir=workdirs/digits_pgm
  python -m pgm_jax.main --config=configs/digits.py:maskgit --workdir=workdirs/digits_maskgit
  # PNG grid (one row per digit) + codes: workdirs/digits_pgm/samples.{png,npz}
  python -m pgm_jax.main --config=configs/digits.py:pgm --workdir=workdirs/digits_pgm \
      --mode=sample --config.sample.sampler=confidence --config.sample.cfg_w=1
  # Classifier metrics of class-conditional samples -> eval.json
  python -m pgm_jax.main --config=configs/digits.py:pgm --workdir=workdirs/digits_pgm --mode=eval
  # Sampling speed and FLOPs, PGM vs MaskGIT (random weights) -> bench.json
  python -m pgm_jax.main --config=configs/digits.py --workdir=workdirs/digits_bench --mode=bench

Presets (comma separated after the colon):
  pgm        class-conditional PartitionDiT, 2 encoder + 2 decoder layers, H = 128 (default).
  maskgit    the MaskGIT baseline, 4 layers, H = 128 (the same depth, as 12+12 vs 24 at scale).
  tiny       H = 32, one layer each, 6 steps: for smoke tests.
  steps=N    number of training steps.
"""
from pgm_jax import tools
from pgm_jax.core import config_lib


def get_config(arg=None):
  preset = config_lib.parse_arg(arg, pgm=False, maskgit=False, tiny=False, steps=0)
  if preset.pgm and preset.maskgit:
    raise ValueError("config presets 'pgm' and 'maskgit' are mutually exclusive")
  c = tools.with_tool_configs(config_lib.image_base_config())
  c.seed = 0

  c.data.name = "digits"
  c.data.num_codes = 17             # grey levels 0..16
  c.data.grid = 8
  c.data.seq_len = 1 + 8 * 8

  c.model.kind = "maskgit" if preset.maskgit else "pgm_image"
  c.model.num_classes = 10
  c.model.hidden = 128
  c.model.num_heads = 2             # head_dim 64, as at scale
  c.model.enc_layers = 2            # PGM 2 + 2
  c.model.dec_layers = 2
  c.model.num_layers = 4            # MaskGIT
  c.model.register = 1 if preset.maskgit else 2
  c.model.dtype = "float32"         # bf16 matmuls are not faster on most CPUs

  c.train.batch_size = 32
  c.train.num_steps = 1000
  c.train.log_every = 100
  c.train.eval_every = 500
  c.eval.batch_size = 120           # 3 batches = the 360 held-out digits

  c.opt.lr = 1e-3                   # a short run: 10x the ImageNet lr, 100 warmup steps
  c.opt.warmup_steps = 100

  c.ckpt.every_steps = 500
  c.ckpt.max_to_keep = 2
  c.sample.steps = 16
  c.sample.bucket_size = 8
  c.sample.batch_size = 100
  c.eval.samples_per_class = 50

  c.bench.setting = "digits"
  c.bench.batch_size = 32
  c.bench.steps = 16
  c.bench.repeats = 3
  c.bench.warmup = 1
  c.bench.pgm = (dict(name="pgm_2_2", hidden=128, num_heads=2, enc_layers=2, dec_layers=2),)
  c.bench.maskgit = dict(hidden=128, num_heads=2, num_layers=4)

  if preset.tiny:
    c.model.update(dict(hidden=32, num_heads=2, enc_layers=1, dec_layers=1, num_layers=2))
    c.train.update(dict(batch_size=8, num_steps=6, log_every=2, eval_every=3))
    c.opt.warmup_steps = 2
    c.eval.batch_size = 120
    c.eval.max_batches = 1
    c.eval.samples_per_class = 2
    c.ckpt.every_steps = 3
    c.sample.steps = 4
    c.sample.samples_per_class = 2
    c.sample.batch_size = 20
    c.sample.bucket_size = 72       # one encoder / query bucket: fewer programs to compile
    c.bench.pgm = (dict(name="pgm_1_1", hidden=32, num_heads=2, enc_layers=1, dec_layers=1),)
    c.bench.maskgit = dict(hidden=32, num_heads=2, num_layers=2)
    c.bench.steps = 4
    c.bench.batch_size = 4
  if preset.steps:
    c.train.num_steps = preset.steps
  return c
