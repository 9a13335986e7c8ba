"""What the rest of pgm_jax asks of a model family (`Family`), with the defaults that text
and image families share.

A family is one module in this package that defines a `Family` subclass and one instance
of it, `FAMILY`; `pgm_jax.families.REGISTRY` maps `config.model.kind` to it. Training,
evaluation, sampling, the converter, plan and bench only ever call these hooks: none of
them compares a kind string. docs/adding_a_family.md walks through adding one.

Hooks (all pure functions of their arguments, jit-able where they touch arrays):
  validate(config)                       family-specific config checks (one-line errors)
  model_config_fields(config, vocab_size, mask_id) -> dict   ModelConfig fields it sets
  build_model(model_cfg)                 the Flax module
  init_args(batch_size, seq_len)         (args, kwargs) of `model.init` (shapes only matter)
  init_params(model, rng)                unboxed parameters (bench, plan)
  train_times(rng, batch, config)        -> (t_B, batch): the per-example time of a train step
  eval_times(rng, batch_size, config, data_parallel) -> t_B
  loss_terms(params, batch, t_B, noise_u_BxL, rngs, ...) -> objectives.LossTerms
  loss_token_count(batch, t_B, noise_u_BxL, ...) -> its num_tokens, without the model
                                         (the global-batch denominator of a train step)
  sample_text(params, prompt, ...)       -> samplers.SampleResult       (text families;
                                         `threshold` = config.sample.threshold, read by the
                                         confidence-threshold sampler only, default 0.9)
  sample_length(config)                  the canvas length of a text sample (config.data.seq_len)
  predict_hidden(params, tokens, hidden, valid, ...)  logits / log p of hidden positions
                                         (masked text families: harness, distillation)
  attention_layers(model_cfg, seq_len)   (mask kind, alive fraction) per attention layer (plan)
  sampler_program(model, setting, sds, key)  one sampler program to compile in plan mode
  torch_name(flax_path)                  the reference state-dict name of a parameter (convert)
  torch_reference                        what its reference checkpoints look like: marker names,
                                         tied entries, description (convert's messages)
  step_flops(model_cfg, ...)             analytic FLOPs of one image sampling step (image bench)
  train_flops(model_cfg, params, B, L)   analytic FLOPs of one optimizer step (plan, train MFU)
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from pgm_jax import objectives
from pgm_jax.io import torch_names
from pgm_jax.io.torch_names import flax_path_to_torch_name
from pgm_jax.models.dit import DiT
from pgm_jax.models.layers import ModelConfig
from pgm_jax.samplers import common as sampler_common

# Expected fraction of (query, key) pairs a mask lets through when t ~ U[0, 1] masks each
# token independently with probability t (the PGM partition): same group t^2 + (1-t)^2,
# E = 2/3; other group 2 t (1 - t), E = 1/3.
ALIVE_FRACTION = {"full": 1.0, "same_group": 2.0 / 3.0, "other_group": 1.0 / 3.0}
# The largest classifier-free guidance weight config.sample.cfg_w accepts (images).
MAX_CFG_W = 20.0


class Family:
  """A model family. Subclasses set the class attributes and override what differs."""
  name: str = ""                       # config.model.kind
  modality: str = "text"               # the data it trains on: "text" | "image"
  samplers: tuple[str, ...] = ()       # config.sample.sampler values it accepts
  default_sampler: str = ""            # what config.sample.sampler="auto" resolves to
  train_objectives: tuple[str, ...] = ("auto",)  # config.train.objective values it accepts
  distillable: bool = False            # config.distill.enabled (SDTT) applies
  time_conditioning: bool = False      # config.model.time_conditioning may be True
  exact_likelihood: bool = False       # log p(x) is exact (left to right), not an ELBO
  mask_logit: float = objectives.NEG_INF_MDLM  # logit[MASK] in its loss
  # The authors' checkpoints of this model (convert): None if they released none.
  torch_reference: Optional[torch_names.ReferenceModel] = None
  stops_at_eos: bool = False           # sample_text stops at eos_id (variable length)
  group_sorted: bool = False           # trains on a partition that config.attn.sorted_layout
                                       # can sort by group (the PGMs)

  @property
  def is_image(self) -> bool:
    return self.modality == "image"

  def __repr__(self):
    return f"<family {self.name}>"

  # -- config and model ---------------------------------------------------------------
  def validate(self, config) -> None:
    """Family-specific checks of a config (errors name the key). The generic ones are in
    `pgm_jax.experiment.validate`."""
    m = config.model
    if bool(m.get("time_conditioning", False)) and not self.time_conditioning:
      raise ValueError(f"config.model.time_conditioning=True needs config.model.kind='mdlm' "
                       f"(got {self.name!r}): the reference's PGM and AR models are never time "
                       f"conditioned")
    objective = config.train.get("objective", "auto")
    if objective not in self.train_objectives:
      raise ValueError(f"config.train.objective={objective} is not available for "
                       f"config.model.kind={self.name!r}: config.train.objective must be one "
                       f"of {self.train_objectives} (complement-mdlm trains an MDLM)")
    if bool(config.get("distill", {}).get("enabled", False)) and not self.distillable:
      raise ValueError(f"config.distill.enabled needs config.model.kind 'pgm' or 'mdlm', "
                       f"got {self.name!r}")
    if config.sample.get("sampler", "auto") == sampler_common.THRESHOLD_SAMPLER:
      sampler_common.check_threshold(config.sample.get("threshold", 0.9),
                                     "config.sample.threshold")

  def model_config_fields(self, config, *, vocab_size: int, mask_id: int) -> dict:
    """ModelConfig fields this family decides (vocabulary, conditioning width, ...)."""
    del config, mask_id
    return {"vocab_size": vocab_size}

  def build_model(self, model_cfg: ModelConfig):
    raise NotImplementedError(f"{self.name}: build_model")

  def init_args(self, batch_size: int, seq_len: int) -> tuple[tuple, dict]:
    """Dummy (args, kwargs) for `model.init`; parameter shapes never depend on seq_len."""
    raise NotImplementedError(f"{self.name}: init_args")

  def init_params(self, model, rng, batch_size: int = 1, seq_len: int = 8):
    """Unboxed parameters of `model` (jit or eval_shape it)."""
    args, kwargs = self.init_args(batch_size, seq_len)
    params = model.init({"params": rng}, *args, **kwargs)["params"]
    return jax.tree.map(lambda x: getattr(x, "value", x), params,
                        is_leaf=lambda x: hasattr(x, "value"))

  # -- training and evaluation ------------------------------------------------------------
  def train_times(self, rng, batch: dict, config) -> tuple[jax.Array, dict]:
    """(t_B, batch) of a train step: t stratified over the global batch (the reference's
    antithetic sampling), the batch unchanged."""
    t_B = stratified_times(rng, batch["tokens"].shape[0], groups=1,
                           sampling_eps=config.train.sampling_eps,
                           antithetic=config.train.antithetic)
    return t_B, batch

  def eval_times(self, rng, batch_size: int, config, data_parallel: int) -> jax.Array:
    """t of a validation batch, stratified within each data-parallel shard (the reference
    stratifies per device at eval)."""
    return stratified_times(rng, batch_size, groups=data_parallel,
                            sampling_eps=config.train.sampling_eps,
                            antithetic=config.train.antithetic)

  def loss_terms(self, params, batch: dict, t_B, noise_u_BxL, rngs: dict, *, model,
                 mask_id: int, train: bool, sampling_eps: float, objective: str = "auto",
                 attend_to_padding: bool = False) -> objectives.LossTerms:
    """LossTerms of one (micro)batch. `noise_u_BxL` (uniform [0, 1)) decides the partition /
    the masked tokens; drawing it for the whole global batch makes gradient accumulation
    exact."""
    raise NotImplementedError(f"{self.name}: loss_terms")

  def loss_token_count(self, batch: dict, t_B, noise_u_BxL, *, sampling_eps: float) -> jax.Array:
    """float32 number of tokens the loss counts (`loss_terms(...).num_tokens`) on the same
    inputs, without the model: the denominator of the global-batch mean that
    `steps.train_step` computes once, before the gradient-accumulation microbatches.
    Default: the valid tokens (the text MDLM and PGM losses, both groups for a PGM)."""
    del t_B, noise_u_BxL, sampling_eps
    return valid_mask(batch).astype(jnp.float32).sum()

  # -- sampling ---------------------------------------------------------------------------
  def sample_text(self, params, prompt, *, model, sampler: str, steps: int, seed: int,
                  mask_id: int, top_p: float, temperature: float, bucket_size: int = 0,
                  progress: Optional[Callable[[int, int], None]] = None,
                  threshold: float = 0.9, eos_id: Optional[int] = None):
    """Samples of `sampler` from `prompt` (its length is `sample_length`): a
    samplers.SampleResult. `threshold` is config.sample.threshold (the confidence-threshold
    sampler's; others ignore it). `eos_id`: the tokenizer's EOS, for families that stop there
    (`stops_at_eos`, SampleResult.lengths); the others ignore it."""
    raise ValueError(f"config.model.kind={self.name!r} does not sample text")

  def sample_length(self, config) -> int:
    """Positions of a text sample, BOS included."""
    return int(config.data.seq_len)

  def predict_hidden(self, params, tokens_BxL, hidden_BxL, valid_BxL, *, model, mask_id: int,
                     sigma_B=None, train: bool = False, rngs: Optional[dict] = None,
                     targets_BxL=None, mask_logit: Optional[float] = None):
    """The model's prediction at `hidden_BxL` positions from the others: float32 logits
    [B, L, V], or with `targets_BxL` log p(targets) [B, L] (logit[MASK] = `mask_logit`,
    default the family's). Masked text families only (harness, distillation)."""
    raise ValueError(f"config.model.kind={self.name!r} does not predict hidden tokens")

  # -- plan, bench, convert ---------------------------------------------------------------
  def attention_layers(self, model_cfg: ModelConfig, seq_len: int) -> list[tuple[str, float]]:
    """(mask kind, alive fraction) of every attention layer of one training forward pass."""
    del seq_len
    return [("full", 1.0)] * model_cfg.num_layers

  def sampler_program(self, *, model, setting: dict, sds: Callable, key) -> dict:
    """{name, fn, args, static, flops_note[, shapes]}: the sampler's jitted program at plan
    mode's `setting` (plan.json's `setting`), for plan mode to compile on one device as
    fn(params, *args, **static). `sds(shape, dtype)` is an abstract input on that device,
    `key` an abstract PRNG key there; `shapes` (optional) are the program's static sizes,
    reported with it. Text families: setting {batch_size, seq_len, steps, n_query} from
    config.bench (n_query: the uniform schedule's largest step); image families (ImageFamily):
    {batch_size, grid, seq_len, steps, sampler, bucket_size, cfg} from config.sample."""
    del model, setting, sds, key
    raise ValueError(f"config.plan.sample_models: {self.name!r} has no sampler program to "
                     f"plan (use 'pgm' or 'mdlm')")

  def torch_name(self, path: tuple[str, ...]) -> tuple[str, bool]:
    """The reference's PyTorch state-dict name of a Flax parameter path (convert)."""
    return flax_path_to_torch_name(path)

  def train_flops(self, model_cfg: ModelConfig, params, batch_size: int, seq_len: int) -> dict:
    r"""Analytic training FLOPs of one optimizer step (whole batch, forward + backward):
    `--mode=plan`'s "model FLOPs" and the numerator of the training loop's MFU.

      FLOPs = 6 * N_mm * B * L  +  12 * H * B * L^2 * sum_layers f_layer

    N_mm = `matmul_params` (per-token matmul weights, output projection included,
    embeddings / adaLN / time embedding excluded); 6 = 2 (multiply-add) x 3 (forward +
    backward). Attention: per live (query, key) pair and layer, QK^T and PV cost
    2 * 2 * H forward (H = num_heads * head_dim), x3 with the backward. f_layer is the
    expected alive fraction of the L^2 pairs (`attention_layers`): 1 for MDLM (full),
    (L+1)/2L for AR (causal); PGM, where every token is in the masked group with
    probability t ~ U[0, 1]: encoder layers (same group) E[t^2 + (1-t)^2] = 2/3, GroupSwap
    and decoder layers (other group) E[2 t (1-t)] = 1/3. Only live pairs count (what
    block-skipping kernels can approach); padding is ignored. `params` may be abstract
    (shapes only). L is config.data.seq_len (images: [BOS] + the codes; registers are not
    counted).
    """
    n_mm = matmul_params(params)
    tokens = batch_size * seq_len
    layers = self.attention_layers(model_cfg, seq_len)
    dense = 6.0 * n_mm * tokens
    attn = 12.0 * model_cfg.hidden * batch_size * seq_len ** 2 * sum(f for _, f in layers)
    return {"matmul_params": n_mm, "dense_flops": dense, "attention_flops": attn,
            "total": dense + attn,
            "attention_alive_fraction": {k: f for k, f in dict(layers).items()}}


def matmul_params(params) -> int:
  """Parameters of the per-token matmuls: every `kernel` except the adaLN modulations and
  the time embedding (`sigma_map`), which act once per sequence; embedding tables (a
  gather) and biases / norms (no matmul) are excluded; the output projection counts."""
  total = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    names = [str(getattr(p, "key", getattr(p, "name", p))) for p in path]
    if names[-1] != "kernel" or any("adaLN" in n or "sigma_map" in n for n in names):
      continue
    total += math.prod(leaf.shape)
  return int(total)


class ImageFamily(Family):
  """Class-conditional models on [BOS] + codes: r ~ U(0, 1) per image, label dropout,
  plain cross-entropy (method §7)."""
  modality = "image"
  samplers = ("halton", "confidence")
  default_sampler = "halton"
  # Behaviours of the authors' samplers that config.sample.reference_compat can reproduce
  # for this family (`samplers.image.REFERENCE_QUIRKS`; off by default).
  reference_quirks: tuple[str, ...] = ()

  def reference_compat(self, config) -> tuple[str, ...]:
    """config.sample.reference_compat as the quirk names `image_sample` takes."""
    from pgm_jax.samplers.image import parse_reference_compat  # pylint: disable=g-import-not-at-top
    return parse_reference_compat(config.sample.get("reference_compat", ""),
                                  self.reference_quirks)

  def validate(self, config) -> None:
    super().validate(config)
    m = config.model
    if int(m.get("num_classes", 0)) <= 0:
      raise ValueError(f"config.model.num_classes must be positive for {self.name}, got "
                       f"{int(m.get('num_classes', 0))}")
    if int(m.get("register", 0)) < 0:
      raise ValueError(f"config.model.register={int(m.get('register', 0))} must be >= 0")
    self.validate_sampling(config)

  def validate_sampling(self, config) -> None:
    """The image sampling and evaluation keys (a NaN guidance weight would otherwise sample
    code 0 everywhere and write a black grid, exit 0)."""
    s = config.sample
    if not (math.isfinite(s.cfg_w) and 0.0 <= s.cfg_w <= MAX_CFG_W):
      raise ValueError(f"config.sample.cfg_w={s.cfg_w} must be finite and in [0, {MAX_CFG_W:g}] "
                       f"(0 = no classifier-free guidance; the paper's runs use at most a few)")
    for key in ("temperature_min", "r_temp"):
      value = s.get(key, 1.0)
      if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"config.sample.{key}={value} must be finite and >= 0")
    quirks = self.reference_compat(config)
    sampler = s.get("sampler", "auto")
    sampler = self.default_sampler if sampler == "auto" else sampler
    if "halton_redraw" in quirks and sampler != "halton":
      raise ValueError(f"config.sample.reference_compat: 'halton_redraw' is a behaviour of "
                       f"the halton sampler, not of config.sample.sampler={sampler!r}")
    for section in ("sample", "eval"):
      count = config[section].get("samples_per_class", 1)
      if int(count) < 1:
        raise ValueError(f"config.{section}.samples_per_class={count} must be >= 1")

  def model_config_fields(self, config, *, vocab_size: int, mask_id: int) -> dict:
    # Images condition on a class embedding of width H (cond_dim = H, as the reference).
    m = config.model
    return {"vocab_size": vocab_size, "cond_dim": m.hidden,
            "num_classes": int(m.get("num_classes", 0)), "register": int(m.get("register", 0)),
            "num_positions": int(config.data.grid) ** 2}

  def sampler_program(self, *, model, setting: dict, sds: Callable, key) -> dict:
    """One step of the image sampler (`samplers.image._image_step`) at the largest static
    shapes a run reaches: the step program of the model's default execution (efficient for
    the PGM: the packed encoder length n_enc and query count n_query, each the largest of
    the run's steps, `samplers.image.step_shapes`; full for MaskGIT: the whole canvas), at
    setting's sampling batch, with classifier-free guidance (the batch doubled inside) when
    setting["cfg"]. Every other step program of the run is no larger in either size (for
    Halton the largest pair is the last step; for confidence, whose queries shrink as the
    encoder grows, it is a bound that no step reaches: `shapes.largest_step_reached`)."""
    from pgm_jax.samplers import image as image_samplers  # pylint: disable=g-import-not-at-top
    cfg = model.config
    execution = image_samplers.default_execution(model)
    batch, grid = int(setting["batch_size"]), int(setting["grid"])
    length = grid * grid + 1
    run = image_samplers.step_shapes(setting["sampler"], grid, int(setting["steps"]),
                                     execution=execution,
                                     bucket_size=int(setting["bucket_size"]))
    n_enc, n_query = max(e for e, _ in run), max(q for _, q in run)
    # A fresh wrapper, so that no trace cached outside the compile target is reused.
    # pylint: disable-next=protected-access
    fn = jax.jit(lambda *a, **k: image_samplers._image_step(*a, **k),
                 static_argnames=image_samplers._STATIC,  # pylint: disable=protected-access
                 donate_argnames=("st",))
    tokens = lambda: sds((batch, length), jnp.int32)
    st = image_samplers.ImageState(canvas=tokens(), clean_tok=tokens(), clean_pos=tokens(),
                                   clean_len=sds((batch,), jnp.int32), rem_pos=tokens(),
                                   rem_len=sds((batch,), jnp.int32))
    k, count = sds((), jnp.int32), sds((), jnp.int32)
    w_k, temp_k, noise_k = (sds((), jnp.float32) for _ in range(3))
    args = (st, sds((batch,), jnp.int32), key, k, count, w_k, temp_k, noise_k)
    static = dict(model=model, execution=execution, sampler=setting["sampler"], n_enc=n_enc,
                  n_query=n_query, cfg=bool(setting["cfg"]), mask_id=cfg.mask_id,
                  bos_id=cfg.mask_id + 1, null_class=cfg.num_classes)
    return dict(name=f"{self.name}_{execution}_step", fn=fn, args=args, static=static,
                flops_note="per call (one sampling step; a run calls it once per step, at "
                           "these shapes or smaller)",
                shapes=dict(execution=execution, n_enc=n_enc, n_query=n_query,
                            largest_step_reached=(n_enc, n_query) in run,
                            programs_in_run=len(set(run)),
                            model_batch=batch * (2 if setting["cfg"] else 1)))

  def train_times(self, rng, batch: dict, config) -> tuple[jax.Array, dict]:
    """r_B ~ U(0, 1) (the "t" slot) and the labels dropped to the null class w.p.
    config.train.label_dropout."""
    r_rng, drop_rng = jax.random.split(rng)
    batch_size = batch["tokens"].shape[0]
    r_B = jax.random.uniform(r_rng, (batch_size,))
    labels = objectives.drop_labels(batch["labels"], jax.random.uniform(drop_rng, (batch_size,)),
                                    config.train.label_dropout, config.model.num_classes)
    return r_B, dict(batch, labels=labels)

  def eval_times(self, rng, batch_size: int, config, data_parallel: int) -> jax.Array:
    del config, data_parallel  # r ~ U(0, 1); labels kept (conditional)
    return jax.random.uniform(rng, (batch_size,))

  def loss_token_count(self, batch: dict, t_B, noise_u_BxL, *, sampling_eps: float) -> jax.Array:
    """Every valid code (position 0 is BOS, never scored); MaskGIT counts its masked ones."""
    del t_B, noise_u_BxL, sampling_eps
    return valid_mask(batch)[:, 1:].astype(jnp.float32).sum()


def stratified_times(rng, batch: int, *, groups: int, sampling_eps: float, antithetic: bool):
  """t for a batch made of `groups` equal slices, each stratified on its own."""
  rngs = jax.random.split(rng, groups)
  per = batch // groups
  ts = jax.vmap(lambda r: objectives.sample_times(r, per, sampling_eps=sampling_eps,
                                                  antithetic=antithetic))(rngs)
  return ts.reshape(batch)


def valid_mask(batch: dict) -> jax.Array:
  """bool [B, L]: batch["valid"], or every position when the batch has none."""
  tokens = batch["tokens"]
  return (batch["valid"] if "valid" in batch else jnp.ones(tokens.shape, bool)).astype(bool)


def dummy_tokens(batch_size: int, seq_len: int):
  return jnp.zeros((batch_size, seq_len), jnp.int32)


class DiTFamily(Family):
  """Families whose network is the DiT over the full sequence (MDLM, and AR with causal
  attention): the same module and the same `model.init` inputs (tokens, and the sigma that
  only a time-conditioned MDLM reads)."""
  torch_reference = torch_names.DIT

  def build_model(self, model_cfg: ModelConfig):
    return DiT(model_cfg)

  def init_args(self, batch_size: int, seq_len: int) -> tuple[tuple, dict]:
    return (dummy_tokens(batch_size, seq_len),), {"sigma_B": jnp.zeros((batch_size,))}

