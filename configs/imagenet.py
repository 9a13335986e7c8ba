r"""ImageNet 256x256, class-conditional, on VQ codes (method §7, the paper's image setting).

Images are LlamaGen VQ-8 codes (codebook 16384): 32x32 = 1024 codes per image, [BOS] first
(MASK = 16384, BOS = 16385, vocabulary 16386, L = 1 + 1024). The data is an ArrayRecord of
(codes int32 [1024], label int32) records written by `python -m pgm_jax.tools.preprocess` from an
ImageNet folder or TFDS imagenet2012, read by the `imagenet_codes` pipeline from
config.data.data_dir.

  python -m pgm_jax.main --config=configs/imagenet.py:pgm_12_12 --workdir=gs://.../pgm_12_12 \
      --config.data.data_dir=/data/imagenet_vq8
  python -m pgm_jax.main --config=configs/imagenet.py:maskgit --workdir=gs://.../maskgit \
      --config.data.data_dir=/data/imagenet_vq8
  # 50 samples per class -> FID and IS (eval.json), with the files of docs/images.md:
  python -m pgm_jax.main --config=configs/imagenet.py:pgm_12_12 --workdir=gs://.../pgm_12_12 \
      --mode=eval --config.data.tokenizer_path=assets/vq_ds8_c2i.npz \
      --config.eval.fid_weights=assets/inception_fid.npz \
      --config.eval.fid_ref_stats=assets/imagenet256_val_stats.npz --config.sample.cfg_w=2
  # The paper's speed setting (S = 32, batch 32) as FLOPs only, on any machine:
  python -m pgm_jax.main --config=configs/imagenet.py:pgm_12_12 --workdir=workdirs/bench_imagenet \
      --mode=bench --config.bench.flops_only=True

Presets:
  pgm_12_12  (default) PGM, 12 encoder + 12 decoder layers, H = 1024, 16 heads, 2 registers
             (494.2M parameters; tests/test_image_models.py pins it to the reference's count).
  pgm_14_10  PGM, 14 + 10 layers (494.2M).
  maskgit    Halton-MaskGIT "large": 24 layers, H = 1024, 16 heads, learned positions,
             1 register (480.4M).
Training hyperparameters are the reference's: AdamW(0.9, 0.999), weight decay 0.03,
lr 1e-4 after 2500 warmup steps, cosine over the last 10% of 1M steps down to 1% of lr,
clipping 1.0, global batch 256, label dropout 0.1, bf16 matmuls, no EMA.
"""
from pgm_jax import tools
from pgm_jax.core import config_lib


def get_config(arg=None):
  preset = config_lib.parse_arg(arg, pgm_12_12=False, pgm_14_10=False, maskgit=False)
  if preset.pgm_12_12 + preset.pgm_14_10 + preset.maskgit > 1:
    raise ValueError("config presets 'pgm_12_12', 'pgm_14_10' and 'maskgit' are mutually "
                     "exclusive")
  c = tools.with_tool_configs(config_lib.image_base_config())

  c.data.name = "imagenet_codes"    # ArrayRecord of (codes, label) records
  c.data.data_dir = config_lib.placeholder(str)
  c.data.num_codes = 16384          # LlamaGen VQ-8 codebook
  c.data.grid = 32                  # 256 px / 8
  c.data.seq_len = 1 + 32 * 32
  c.data.tokenizer_path = ""        # the VQ-8 weights: decodes samples (PNG grids, FID)

  c.model.num_classes = 1000
  c.model.hidden = 1024
  c.model.num_heads = 16
  c.model.dtype = "bfloat16"
  c.model.dropout = 0.1
  # Rematerialise every block but keep its matmul outputs: without it 8 sequences of 1025
  # codes per v5e chip need 7.7 GiB of temporaries next to a 7.4 GiB state and do not fit
  # (docs/scaling.md, "ImageNet presets"); with it the v5e-32 peak is 13.0-13.4 GiB.
  c.model.remat = "dots_with_no_batch_dims_saveable"
  if preset.maskgit:
    c.model.kind = "maskgit"
    c.model.num_layers = 24
    c.model.register = 1
  else:
    c.model.kind = "pgm_image"
    c.model.enc_layers, c.model.dec_layers = (14, 10) if preset.pgm_14_10 else (12, 12)
    c.model.register = 2

  c.train.batch_size = 256
  c.train.num_steps = 1_000_000
  c.train.log_every = 100
  c.train.eval_every = 20_000
  c.eval.batch_size = 256
  c.eval.max_batches = 40           # val loss on 10k images
  c.eval.metric = "fid"
  c.eval.samples_per_class = 50     # 50k samples, one per ImageNet-val image
  c.ckpt.every_steps = 10_000

  c.sample.sampler = "halton"
  c.sample.steps = 32
  c.sample.batch_size = 32
  c.sample.classes = (1, 7, 282, 604, 724, 179, 751, 404, 850)  # the reference's grid

  # --mode=bench: the paper's speed setting (batch 32 images/s, batch 1 latency, S = 32).
  c.bench.setting = "paper"
  c.bench.batch_size = 32
  c.bench.steps = 32
  c.bench.repeats = 10              # the reference: 12 runs, first 2 dropped
  c.bench.warmup = 2
  c.bench.pgm = (dict(name="pgm_12_12", hidden=1024, num_heads=16, enc_layers=12, dec_layers=12),
                 dict(name="pgm_14_10", hidden=1024, num_heads=16, enc_layers=14, dec_layers=10))
  c.bench.maskgit = dict(hidden=1024, num_heads=16, num_layers=24)
  return c
