"""The experiment's config: its sections' defaults, preset parsing, and the checks of its
own sections (`check_sections`; `pgm_jax.experiment.validate` is the one entry point).

Config files in `configs/` build on `base_config()` (plus the tools' sections,
`pgm_jax.tools.with_tool_configs`) and take a preset string,
e.g. `--config=configs/shakespeare.py:mdlm,runlocal`. Every key can be overridden
on the command line (`--config.opt.lr=1e-4`); configs are locked, so a misspelt
key is an error naming that key.
"""
from __future__ import annotations

import math

import ml_collections
from ml_collections import config_dict

from pgm_jax.core import throughput

placeholder = config_dict.placeholder


def base_config() -> ml_collections.ConfigDict:
  """Defaults shared by every config: the paper's text hyperparameters (method §6)."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  # --- model: architecture (method §3). -------------------------------------
  c.model = ml_collections.ConfigDict()
  c.model.kind = "pgm"              # "pgm" (PartitionDiT) | "mdlm" (DiT baseline) |
                                    # "ar" (the same DiT, causal: the offline judge)
  c.model.hidden = 768              # H
  c.model.num_heads = 12            # head_dim = H / num_heads (64 in the paper)
  c.model.cond_dim = 128            # adaLN conditioning width c
  c.model.mlp_ratio = 4
  c.model.num_layers = 12           # MDLM blocks
  c.model.enc_layers = 6            # PGM encoder blocks
  c.model.dec_layers = 6            # PGM decoder blocks
  c.model.query_mode = "learn+freqs"  # learn | learn+freqs | learn+freqs+mean | learn+freqs+logsumexp
  c.model.dropout = 0.1
  c.model.dtype = "bfloat16"        # compute dtype; parameters stay float32
  c.model.remat = "none"            # activation rematerialisation of every transformer block:
                                    # none | full (= nothing_saveable) | any policy name in
                                    # jax.checkpoint_policies, e.g. dots_saveable,
                                    # dots_with_no_batch_dims_saveable
  c.model.loss_chunk_len = 0        # > 0: the output projection + log-softmax + target
                                    # log-prob run over chunks of this many positions
                                    # (rematerialised), so float32 [B, L, V] logits never
                                    # exist in training / eval; 0 = the whole sequence at once
  c.model.block_len = 0             # pgm_block: tokens per block (a divisor of data.seq_len)
  c.model.time_conditioning = False  # MDLM only: the DiT reads sigma = -log alpha(t) (the
                                    # reference's algo.time_conditioning; false in every
                                    # released config, where the network gets sigma = 0)

  # --- data: corpus, tokenizer, packing. ------------------------------------------
  c.data = ml_collections.ConfigDict()
  c.data.name = "shakespeare"       # shakespeare | text_files | array_record | lm1b
  c.data.tokenizer = "sentencepiece"  # sentencepiece | gpt2 | bert_wordpiece
  c.data.tokenizer_path = "third_party/sentencepiece/shakespeare_bpe2048.model"
  c.data.seq_len = 1024             # L, BOS and EOS included
  c.data.data_dir = placeholder(str)
  c.data.train_files = placeholder(str)
  c.data.val_files = placeholder(str)
  c.data.doc_per_line = False
  c.data.documents = "play"         # shakespeare: play (one document each) | speech (one per
                                    # blank-line-separated paragraph: EOS ends every speech)
  c.data.val_plays = ("hamlet", "tempest", "twelfth_night")
  c.data.num_workers = 0
  c.data.attend_to_padding = False  # True: pads are fed to every attention (and get groups /
                                    # noise) and are masked only in the loss, as the
                                    # reference's LM1B; False: keys at pads are masked out
  c.data.detokenizer = "none"       # text cleanup before tokenizing (pgm_jax.data.detokenizers):
                                    # none | lm1b | wikitext | ptb | lambada | scientific_papers

  # --- train: loop and objective. -------------------------------------------------
  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 512          # GLOBAL batch (sequences per optimizer step)
  c.train.grad_accum_steps = 1      # microbatches per step; batch_size must divide
  c.train.num_steps = 1_000_000
  c.train.sampling_eps = 1e-3       # t ~ U[eps, 1]
  c.train.objective = "auto"        # auto (the model kind's own) | complement-mdlm (MDLM only:
                                    # trained on x_t and its complement at time 1 - t; scored
                                    # as an MDLM in eval, like the reference's ComplementMDLM)
  c.train.antithetic = True         # stratified t over the global batch
  c.train.log_every = 100
  c.train.eval_every = 20_000
  c.train.num_final_samples = 4     # decoded at the end of training (0 = none)
  c.train.profile_steps = ()        # (start, stop): trace steps start..stop (inclusive, the
                                    # step numbers of the log) with jax.profiler into
                                    # WORKDIR/tensorboard (process 0 only); () = off
  c.train.peak_flops_per_chip = placeholder(float)  # bf16 peak for train/mfu; None = the
                                    # table of pgm_jax/core/throughput.py (no mfu if unknown)

  # --- eval: validation perplexity. -----------------------------------------------
  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 64
  c.eval.max_batches = placeholder(int)  # None = the whole validation split
  c.eval.seed = 1234                # fixed, so val PPL is reproducible
  c.eval.gen_ppl = False            # --mode=eval also samples and scores: gen PPL + entropy
  c.eval.judge_workdir = placeholder(str)  # workdir of a trained "ar" model (the judge)
  c.eval.gen_num_samples = 16       # samples scored (config.sample.* picks sampler, steps)
  c.eval.datasets = ""              # zero-shot sets instead of the validation split, e.g.
                                    # "wikitext2,ptb,lambada" or "ptb=/data/ptb_val.jsonl"
                                    # (pgm_jax/evaluation/zero_shot.py; never downloaded)
  c.eval.datasets_dir = placeholder(str)  # folder of <set>.jsonl files / TFDS data_dir
  c.eval.group_docs = 1000          # zero-shot packing: records per group (remainder dropped)

  # --- opt: AdamW, warmup then constant, clipping, EMA. ---------------------------
  c.opt = ml_collections.ConfigDict()
  c.opt.lr = 3e-4
  c.opt.warmup_steps = 2500
  c.opt.b1 = 0.9
  c.opt.b2 = 0.999
  c.opt.eps = 1e-8
  c.opt.weight_decay = 0.0
  c.opt.grad_clip = 1.0
  c.opt.ema_decay = 0.9999          # warm-up: min(decay, (1 + n) / (10 + n)); 0 disables EMA

  # --- distill: SDTT distillation (method §8; pgm_jax/distill.py). --------------
  # enabled=True turns training (--mode=train, the same loop, checkpoints and metrics)
  # into distillation: teacher and student start from the EMA weights of
  # `teacher_workdir`; eval / sample / bench then work on the student as on any model.
  c.distill = ml_collections.ConfigDict()
  c.distill.enabled = False
  c.distill.teacher_workdir = placeholder(str)  # workdir (or converted checkpoint) of the
                                    # pre-trained model: its latest EMA weights
  c.distill.round_steps = 10_000    # dt grows by teacher_steps (x2) and the student is
                                    # copied into the teacher every this many steps
  c.distill.initial_steps = 1024    # dt of round 1 = (1 - sampling_eps) / initial_steps
  c.distill.teacher_steps = 2       # ancestral teacher steps the student matches in one
  c.distill.loss = "kl-bwd"         # kl-bwd: KL(student || teacher) | kl-fwd: KL(teacher ||
                                    # student); float32, mean over masked tokens
  c.distill.sampling_eps = 1e-5     # t ~ U[eps, 1] (antithetic) for distillation
  c.distill.normalizer = "ours"     # ours: MASK out of the softmax | reference: the
                                    # authors' SDTT, MASK logit 0 in the normaliser at masked
                                    # positions (docs/distillation.md)

  # --- attn: the attention op. ----------------------------------------------------
  c.attn = ml_collections.ConfigDict()
  c.attn.impl = "auto"              # auto (the Pallas kernels on TPU/GPU, the dense XLA path
                                    # on CPU) | xla (dense oracle) | pallas (the kernels;
                                    # interpreted on CPU)
  c.attn.block_q = 128              # Pallas query block (an upper bound: lengths are padded
  c.attn.block_kv = 128             # to the kernel tiling); Pallas key/value block
  # PGM training: sort tokens by group so that the kernels skip the masked half of every
  # attention (same function). "auto": sorted iff the attention resolves to the Pallas
  # kernels (impl pallas, or auto on TPU/GPU, at trace time); True / False force it.
  c.attn.sorted_layout = ml_collections.FieldReference("auto", field_type=object)

  # --- mesh: device mesh and logical axis rules. ----------------------------------
  c.mesh = ml_collections.ConfigDict()
  c.mesh.axes = ("data", "fsdp", "tensor")
  c.mesh.shape = (-1, 1, 1)         # one -1 = all remaining devices; the whole mesh
  c.mesh.dcn_shape = (1, 1, 1)      # multi-slice: slices per axis (over DCN), one -1 allowed;
                                    # each slice's (ICI) mesh is shape / dcn_shape per axis.
                                    # All ones = one slice (docs/scaling.md, "Mesh")
  c.mesh.logical_axis_rules = (
      ("batch", ("data", "fsdp")),     # activations' batch dimension
      ("length", None),                # activations' sequence dimension
      ("act_embed", None),             # activations' hidden dimension
      ("vocab", "tensor"),
      ("embed", "fsdp"),
      ("mlp", "tensor"),
      ("qkv", "tensor"),
      ("kv", "tensor"),
      ("heads_dim", "tensor"),
      ("adaln", "tensor"),
      ("cond", None),
      ("cond_mlp", None),
      ("freq", None),
  )

  # --- ckpt: one Orbax manager (train state + data iterator). ---------------------
  c.ckpt = ml_collections.ConfigDict()
  c.ckpt.every_steps = 5000
  c.ckpt.max_to_keep = 3
  c.ckpt.keep_every = placeholder(int)   # also keep every N-th step forever
  c.ckpt.async_save = True
  c.ckpt.restore_from = placeholder(str)     # full state, if the workdir has none
  c.ckpt.init_params_from = placeholder(str)  # params only (fresh optimizer)

  # --- sample: samplers (--mode=sample and end-of-training samples). -------------
  c.sample = ml_collections.ConfigDict()
  c.sample.sampler = "auto"         # auto | PGM: efficient-uniform, efficient-non-uniform,
                                    # naive | MDLM: ddpm_cache, ddpm | both: confidence-threshold
  c.sample.num_samples = 8
  c.sample.batch_size = 8           # sequences per sampling batch
  c.sample.steps = 128              # S (the reference asserts seq_len % S == 0; we don't)
  c.sample.seed = 0
  c.sample.top_p = 1.0              # nucleus filtering (1.0 = off)
  c.sample.temperature = 1.0
  c.sample.bucket_size = 0          # PGM encoder length buckets; 0 = max(8, seq_len // 16)
  c.sample.max_len = 0              # block PGM: longest sample (a multiple of model.block_len;
                                    # 0 = data.seq_len); it stops earlier at EOS
  c.sample.threshold = 0.9          # confidence-threshold: reveal every position whose draw has
                                    # probability >= this, at least one per step (0 = all in one
                                    # pass); config.sample.steps caps the passes
  c.sample.prompt = ""              # prefix, or infill with [[N]] gaps: "To be[[5]]question"
  c.sample.prompt_file = placeholder(str)  # one prompt per line (cycled over samples)

  return c


def image_base_config() -> ml_collections.ConfigDict:
  """`base_config()` plus the image keys (method §7), with the image reference's training
  hyperparameters: AdamW(0.9, 0.999), weight decay 0.03, lr 1e-4, 2500 warmup steps, a cosine
  decay over the last 10% of the run down to 1% of lr, clipping 1.0, no EMA, label dropout 0.1.
  configs/digits.py and configs/imagenet.py build on it."""
  c = base_config()
  c.model.kind = "pgm_image"        # pgm_image (class-conditional PartitionDiT) | maskgit
  c.model.num_classes = 1000        # the class table has one more row: the null class (CFG)
  c.model.register = 2              # learned register tokens (pgm_image: half per group;
                                    # maskgit: appended after the codes)
  c.model.dropout = 0.1
  # (config.model.cond_dim is not used: images condition on a class embedding of width H.)

  c.data.name = "digits"            # an image source of pgm_jax.data.images.IMAGE_SOURCES
  c.data.tokenizer = "image_codes"  # codes, then MASK = num_codes, BOS = num_codes + 1
  c.data.num_codes = 17
  c.data.grid = 8                   # G: G x G codes per image, row-major
  c.data.seq_len = 1 + 8 * 8        # [BOS] + the codes
  c.data.tokenizer_path = ""        # VQ codes: the VQ-8 weights (vq_ds8_c2i.npz), used to
                                    # decode samples into pixels (PNG grids, FID); digits: unused

  c.train.label_dropout = 0.1       # labels -> null class w.p. 0.1 (classifier-free guidance)
  c.train.num_final_samples = 1     # > 0: a PNG grid (one row per class) at the end

  c.opt.lr = 1e-4
  c.opt.weight_decay = 0.03
  c.opt.warmup_steps = 2500
  c.opt.ema_decay = 0.0             # no EMA (the reference's image runs)
  c.opt.schedule = "cosine_tail"    # constant | cosine_tail (cosine over the last
  c.opt.decay_fraction = 0.1        # decay_fraction of decay_end steps, floored at
  c.opt.min_lr_fraction = 0.01      # min_lr_fraction * lr)
  c.opt.decay_end = placeholder(int)  # None = config.train.num_steps

  c.sample.sampler = "auto"         # auto (= halton) | halton | confidence
  c.sample.steps = 32
  c.sample.cfg_w = 0.0              # classifier-free guidance w in [0, 20] (w_k = w k / (S - 1))
  c.sample.temperature = 1.0        # Halton: logits x linspace(temperature_min, temperature,
  c.sample.temperature_min = 1.0    # S)[k], x0.5 on step 0; confidence: logits x temperature
  c.sample.r_temp = 5.0             # confidence: Gumbel noise scale r_temp (1 - k / (S - 1))
  c.sample.classes = ()             # classes of the --mode=sample grid (one row each);
                                    # () = every class when num_classes <= 16, else 0..9
  c.sample.samples_per_class = 8    # columns of the grid
  c.sample.batch_size = 64          # images per sampling batch
  c.sample.reference_compat = ""    # "" | all | registers_count (PGM), halton_redraw
                                    # (MaskGIT): the authors' sampler quirks (docs/images.md)

  c.eval.metric = "classifier"      # classifier (digits: the repo's small classifier) | fid
  c.eval.samples_per_class = 50     # class-conditional samples per class for the metrics
  c.eval.fid_weights = placeholder(str)    # fid: the FID Inception weights (inception_fid.npz)
  c.eval.fid_ref_stats = placeholder(str)  # fid: reference statistics .npz (mu, sigma) or a
                                           # folder of reference images

  return c


DISTILL_LOSSES = ("kl-bwd", "kl-fwd")
DISTILL_NORMALIZERS = ("ours", "reference")


def distill_enabled(config) -> bool:
  """config.distill.enabled; False for configs written before the section existed (e.g.
  an older judge's config.json)."""
  d = config.get("distill")
  return bool(d is not None and d.get("enabled", False))


def apply_runlocal(c, *, hidden: int = 128, cond_dim: int | None = None,
                   seq_len: int | None = None, eval_batch_size: int = 8,
                   eval_max_batches: int = 2):
  """Shrinks a config in place for a CPU smoke run: 2 heads, MDLM 2 layers, PGM 1 + 1,
  batch 8, 20 steps (log every 5, eval and checkpoint every 10), 8 sampling steps."""
  c.model.update(dict(hidden=hidden, num_heads=2, num_layers=2, enc_layers=1, dec_layers=1))
  if cond_dim is not None:
    c.model.cond_dim = cond_dim
  if seq_len is not None:
    c.data.seq_len = seq_len
  c.train.update(dict(batch_size=8, num_steps=20, log_every=5, eval_every=10))
  c.eval.batch_size = eval_batch_size
  c.eval.max_batches = eval_max_batches
  c.ckpt.every_steps = 10
  c.sample.steps = 8
  c.eval.gen_num_samples = 2
  c.harness.update(dict(num_mc_samples=4, batch_size=4, bucket_size=16))
  return c


def parse_arg(arg: str | None, **defaults):
  """Parses "a=1,b,c=x" into a ConfigDict; bare words are True. Unknown keys fail.

  `defaults` gives every allowed key and its default (types are kept).
  """
  result = ml_collections.ConfigDict(defaults)
  if not arg:
    return result
  for item in arg.split(","):
    item = item.strip()
    if not item:
      continue
    key, _, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"unknown config preset {key!r}; known: {sorted(defaults)}")
    default = defaults[key]
    if not _:
      result[key] = True
    elif isinstance(default, bool):
      result[key] = value.lower() in ("1", "true", "yes")
    elif isinstance(default, int):
      result[key] = int(value)
    elif isinstance(default, float):
      result[key] = float(value)
    else:
      result[key] = value
  return result


def mesh_dcn_shape(mesh_config) -> tuple[int, ...] | None:
  """config.mesh.dcn_shape checked without devices (one-line errors naming the key): None
  when it means one slice (None, absent or all ones), else one int per config.mesh.axes,
  each positive or -1 (at most one: the remaining slices)."""
  dcn = mesh_config.get("dcn_shape")
  if dcn is None:
    return None
  try:
    dcn = tuple(int(s) for s in dcn)
  except (TypeError, ValueError):
    raise ValueError(f"config.mesh.dcn_shape={dcn!r}: expected integer sizes such as (2, 1, 1) "
                     "(on the command line: --config.mesh.dcn_shape=2,1,1)") from None
  if all(s == 1 for s in dcn):
    return None
  axes = tuple(mesh_config.axes)
  if len(dcn) != len(axes):
    raise ValueError(f"config.mesh.dcn_shape={dcn} and config.mesh.axes={axes} differ in length")
  if dcn.count(-1) > 1:
    raise ValueError(f"config.mesh.dcn_shape={dcn}: at most one axis may be -1")
  if any(s == 0 or s < -1 for s in dcn):
    raise ValueError(f"config.mesh.dcn_shape={dcn}: sizes must be positive or -1")
  return dcn


def check_sections(config, *, num_devices: int, data_parallel: int,
                   mesh_shape=None) -> None:
  """The checks of the experiment's own sections (train, data, eval, opt, sample, ckpt,
  distill, mesh), errors naming the config key. `pgm_jax.experiment.validate` is the one
  entry point: it runs these, the model and attention checks, and the family's.

  `mesh_shape` ({axis: size} of the resolved mesh) enables the mesh checks: rules
  that name unknown mesh axes, and heads vs the tensor-parallel size.
  """
  t, d, m = config.train, config.data, config.model
  mesh_dcn_shape(config.mesh)
  if mesh_shape is not None:
    mesh_shape = dict(mesh_shape)
    if len(set(config.mesh.axes)) != len(tuple(config.mesh.axes)):
      raise ValueError(f"config.mesh.axes={tuple(config.mesh.axes)} has a repeated name")
    for name, axes in config.mesh.logical_axis_rules:
      axes = (axes,) if isinstance(axes, str) or axes is None else tuple(axes)
      unknown = [a for a in axes if a is not None and a not in mesh_shape]
      if unknown:
        raise ValueError(f"config.mesh.logical_axis_rules maps {name!r} to mesh axes "
                         f"{unknown} that are not in config.mesh.axes={tuple(mesh_shape)}")
    tensor = mesh_shape.get("tensor", 1)
    if m.num_heads % tensor:
      raise ValueError(f"config.model.num_heads={m.num_heads} must be divisible by the "
                       f"tensor-parallel size {tensor} (config.mesh.shape)")
  if t.batch_size <= 0:
    raise ValueError(f"config.train.batch_size must be positive, got {t.batch_size}")
  if t.grad_accum_steps <= 0 or t.batch_size % t.grad_accum_steps:
    raise ValueError(f"config.train.batch_size={t.batch_size} must be divisible by "
                     f"config.train.grad_accum_steps={t.grad_accum_steps}")
  micro = t.batch_size // t.grad_accum_steps
  if micro % data_parallel:
    raise ValueError(
        f"config.train.batch_size / config.train.grad_accum_steps = {micro} must be "
        f"divisible by the data-parallel size {data_parallel} (config.mesh.shape)")
  if config.eval.batch_size % data_parallel:
    raise ValueError(f"config.eval.batch_size={config.eval.batch_size} must be divisible by "
                     f"the data-parallel size {data_parallel} (config.mesh.shape)")
  if d.seq_len < 3:
    raise ValueError(f"config.data.seq_len={d.seq_len} must be >= 3 (BOS + token + EOS)")
  if t.num_steps < 0:
    raise ValueError(f"config.train.num_steps must be >= 0, got {t.num_steps}")
  if not 0.0 <= m.dropout < 1.0:
    raise ValueError(f"config.model.dropout must be in [0, 1), got {m.dropout}")
  if m.dtype not in ("bfloat16", "float32", "float16"):
    raise ValueError(f"config.model.dtype must be bfloat16|float32|float16, got {m.dtype!r}")
  if not 0.0 < t.sampling_eps < 1.0:
    raise ValueError(f"config.train.sampling_eps must be in (0, 1), got {t.sampling_eps}")
  for key in ("log_every", "eval_every"):
    if t[key] <= 0:
      raise ValueError(f"config.train.{key} must be positive, got {t[key]}")
  if config.ckpt.every_steps <= 0 or config.ckpt.max_to_keep <= 0:
    raise ValueError("config.ckpt.every_steps and config.ckpt.max_to_keep must be positive")
  validate_opt(config.opt)
  validate_sample(config)
  e = config.eval
  if e.batch_size <= 0:
    raise ValueError(f"config.eval.batch_size must be positive, got {e.batch_size}")
  if e.get("max_batches") is not None and e.max_batches <= 0:
    raise ValueError(f"config.eval.max_batches must be positive or None, got {e.max_batches}")
  if e.gen_num_samples <= 0:
    raise ValueError(f"config.eval.gen_num_samples must be positive, got {e.gen_num_samples}")
  if t.num_final_samples < 0:
    raise ValueError(f"config.train.num_final_samples must be >= 0, got {t.num_final_samples}")
  profile_window(t)
  throughput.check_peak_override(t.get("peak_flops_per_chip"))
  if distill_enabled(config):
    _validate_distill(config)
  del num_devices


def profile_window(t) -> tuple[int, int] | None:
  """config.train.profile_steps as (start, stop), None when off (() or None); a one-line
  error for anything else."""
  value = t.get("profile_steps", ())
  if value is None or (isinstance(value, (tuple, list)) and len(value) == 0):
    return None
  ok = (isinstance(value, (tuple, list)) and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        and 1 <= value[0] <= value[1])
  if not ok:
    raise ValueError(f"config.train.profile_steps={value!r} must be () (off) or (start, stop): "
                     f"the step numbers to trace, 1 <= start <= stop, e.g. (100, 105)")
  return int(value[0]), int(value[1])


def validate_opt(o) -> None:
  """config.opt: values that would silently train the wrong way (a negative lr ascends)."""
  if o.lr < 0:
    raise ValueError(f"config.opt.lr={o.lr} must be >= 0 (a negative rate ascends the loss)")
  if o.warmup_steps < 0:
    raise ValueError(f"config.opt.warmup_steps must be >= 0, got {o.warmup_steps}")
  for key in ("b1", "b2"):
    if not 0.0 <= o[key] < 1.0:
      raise ValueError(f"config.opt.{key} must be in [0, 1), got {o[key]}")
  for key in ("eps", "weight_decay", "grad_clip"):
    if not o[key] >= 0:
      raise ValueError(f"config.opt.{key} must be >= 0, got {o[key]}")
  if not 0.0 <= o.ema_decay < 1.0:
    raise ValueError(f"config.opt.ema_decay must be in [0, 1) (0 disables EMA), "
                     f"got {o.ema_decay}")


def validate_sample(config) -> None:
  """config.sample: the sampling parameters (checked before any sampling work)."""
  s = config.sample
  if not 0.0 < s.top_p <= 1.0:
    raise ValueError(f"config.sample.top_p={s.top_p} must be in (0, 1] (1 = no nucleus "
                     f"filtering)")
  if not (s.temperature >= 0.0 and math.isfinite(s.temperature)):
    raise ValueError(f"config.sample.temperature={s.temperature} must be >= 0 and finite "
                     f"(0 = greedy: the most likely token)")
  if s.num_samples < 1:
    raise ValueError(f"config.sample.num_samples={s.num_samples} must be >= 1")
  if s.batch_size < 1:
    raise ValueError(f"config.sample.batch_size={s.batch_size} must be >= 1")
  if s.bucket_size < 0:
    raise ValueError(f"config.sample.bucket_size={s.bucket_size} must be >= 0 (0 = automatic)")


def _validate_distill(config) -> None:
  d, t = config.distill, config.train
  if d.loss not in DISTILL_LOSSES:
    raise ValueError(f"config.distill.loss must be one of {DISTILL_LOSSES}, got {d.loss!r}")
  if d.get("normalizer", "ours") not in DISTILL_NORMALIZERS:
    raise ValueError(f"config.distill.normalizer must be one of {DISTILL_NORMALIZERS}, "
                     f"got {d.normalizer!r}")
  if config.ckpt.get("init_params_from"):
    raise ValueError("config.ckpt.init_params_from is not used by distillation: the "
                     "teacher's checkpoint goes in config.distill.teacher_workdir")
  if d.teacher_steps < 2:
    raise ValueError(f"config.distill.teacher_steps must be >= 2, got {d.teacher_steps}")
  if d.round_steps <= 0 or d.initial_steps <= 0:
    raise ValueError(f"config.distill.round_steps ({d.round_steps}) and "
                     f"config.distill.initial_steps ({d.initial_steps}) must be positive")
  if not 0.0 < d.sampling_eps < 1.0:
    raise ValueError(f"config.distill.sampling_eps must be in (0, 1), got {d.sampling_eps}")
  rounds = max(1, -(-t.num_steps // d.round_steps))
  if d.initial_steps < d.teacher_steps ** rounds:
    raise ValueError(
        f"config.train.num_steps={t.num_steps} spans {rounds} rounds of "
        f"config.distill.round_steps={d.round_steps}: the last student would take "
        f"config.distill.initial_steps={d.initial_steps} / {d.teacher_steps}^{rounds} < 1 "
        f"sampling steps; lower config.train.num_steps or raise config.distill.initial_steps")
