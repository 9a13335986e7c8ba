"""PyTorch checkpoint import (pgm_jax.tools.convert) against an independent NumPy forward pass.

Checkpoints are built here in the reference's exact Lightning format: a dict with
"state_dict" {"backbone.<name>": tensor}, "ema" {"shadow_params": [...]} (in
parameters() order) and "global_step", saved with torch.save. Every parameter gets
random values (the zero-initialised adaLN / output layers included). The converted
Orbax checkpoint is restored the way the trainer does and its logits are compared
with `ref_pgm` / `ref_mdlm` below, written from the method description (docs/method.md, docs/convert.md) in float64.
"""
import math
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO_ROOT, load_config
from pgm_jax import experiment
from pgm_jax.core import checkpointing
from pgm_jax.tools import convert
from pgm_jax.ops import AttentionMask

torch = pytest.importorskip("torch")

H, HEADS, C, V = 32, 2, 16, 50
ENC, DEC, MDLM_LAYERS = 2, 2, 2
B, L = 3, 12

# ----------------------------------------------------------------------------
# Reference state-dict layout (docs/convert.md), in the modules' registration order.
# ----------------------------------------------------------------------------


def _mlp(prefix, h):
  return [(f"{prefix}mlp.0.weight", (4 * h, h)), (f"{prefix}mlp.0.bias", (4 * h,)),
          (f"{prefix}mlp.2.weight", (h, 4 * h)), (f"{prefix}mlp.2.bias", (h,))]


def _dit_block(prefix, h, c):
  return ([(f"{prefix}norm1.weight", (h,)), (f"{prefix}attn_qkv.weight", (3 * h, h)),
           (f"{prefix}attn_out.weight", (h, h)), (f"{prefix}norm2.weight", (h,))]
          + _mlp(prefix, h)
          + [(f"{prefix}adaLN_modulation.weight", (6 * h, c)),
             (f"{prefix}adaLN_modulation.bias", (6 * h,))])


def _head(v, h, c, heads):
  """vocab_embed, sigma_map, rotary buffer (registration order of the reference)."""
  return [("vocab_embed.embedding", (v, h)),
          ("sigma_map.mlp.0.weight", (c, 256)), ("sigma_map.mlp.0.bias", (c,)),
          ("sigma_map.mlp.2.weight", (c, c)), ("sigma_map.mlp.2.bias", (c,)),
          ("rotary_emb.inv_freq", (h // heads // 2,))]


def _output(v, h, c):
  return [("output_layer.norm_final.weight", (h,)), ("output_layer.linear.weight", (v, h)),
          ("output_layer.linear.bias", (v,)),
          ("output_layer.adaLN_modulation.weight", (2 * h, c)),
          ("output_layer.adaLN_modulation.bias", (2 * h,))]


def pgm_layout(v=V, h=H, c=C, heads=HEADS, enc=ENC, dec=DEC):
  names = _head(v, h, c, heads)
  for i in range(enc):
    names += _dit_block(f"encoder.blocks.{i}.", h, c)
  g = "decoder.group_swap."
  names += [(g + "base_embedding", (1, h)), (g + "pre_query_norm.weight", (h,)),
            (g + "pre_query_norm.bias", (h,)), (g + "query_processor.weight", (h, h)),
            (g + "query_processor.bias", (h,)), (g + "hidden_to_key_value.weight", (2 * h, h)),
            (g + "hidden_to_key_value.bias", (2 * h,)), (g + "output_linear.weight", (h, h)),
            (g + "output_linear.bias", (h,))]
  for j in range(dec):
    p = f"decoder.layers.{j}."
    names += ([(p + "q_norm1.weight", (h,)), (p + "kv_norm1.weight", (h,)),
               (p + "attn_q.weight", (h, h)), (p + "attn_kv.weight", (2 * h, h)),
               (p + "attn_out.weight", (h, h)), (p + "norm2.weight", (h,))]
              + _mlp(p, h)
              + [(p + "adaLN_modulation.weight", (6 * h, c)),
                 (p + "adaLN_modulation.bias", (6 * h,))])
  return names + _output(v, h, c)


def mdlm_layout(v=V, h=H, c=C, heads=HEADS, layers=MDLM_LAYERS):
  names = _head(v, h, c, heads)
  for i in range(layers):
    names += _dit_block(f"blocks.{i}.", h, c)
  return names + _output(v, h, c)


def random_weights(layout, seed, heads=HEADS):
  """Random float32 values for every entry; inv_freq as the reference computes it."""
  rng = np.random.default_rng(seed)
  out = {}
  for name, shape in layout:
    if name.endswith("inv_freq"):
      d = 2 * shape[0]
      out[name] = (1.0 / 10000 ** (np.arange(0, d, 2) / d)).astype(np.float32)
      continue
    if re.search(r"norm\w*\.weight$", name):       # LayerNorm scales
      x = 1.0 + 0.2 * rng.standard_normal(shape)
    elif name.endswith(".bias"):
      x = 0.2 * rng.standard_normal(shape)
    elif name.endswith("embedding"):
      x = rng.standard_normal(shape)
    else:  # Linear weight [out, in]
      x = rng.standard_normal(shape) / math.sqrt(shape[1])
    out[name] = x.astype(np.float32)
  return out


def save_lightning(path, raw, ema, step=123, extra=None):
  """torch.save of the reference Lightning layout."""
  params = [k for k in raw if not k.endswith("inv_freq")]
  ckpt = {
      "epoch": 0, "global_step": step, "pytorch-lightning_version": "2.2.1",
      "state_dict": {f"backbone.{k}": torch.from_numpy(v.copy()) for k, v in raw.items()},
      "ema": {"decay": 0.9999, "num_updates": step,
              "shadow_params": [torch.from_numpy(ema[k].copy()) for k in params]},
      "optimizer_states": [{"state": {}, "param_groups": [{"lr": 3e-4, "params": [0]}]}],
      "lr_schedulers": [], "loops": {},
  }
  if extra:
    ckpt.update(extra)
  torch.save(ckpt, path)


# ----------------------------------------------------------------------------
# Independent NumPy forward pass (float64), written from docs/method.md.
# ----------------------------------------------------------------------------

def _f64(sd):
  return {k: np.asarray(v, np.float64) for k, v in sd.items()}


def _linear(sd, name, x, bias=True):
  y = x @ sd[name + ".weight"].T
  return y + sd[name + ".bias"] if bias else y


def _ln(x, w, b=None):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  y = (x - mu) / np.sqrt(var + 1e-5) * w
  return y if b is None else y + b


def _silu(x):
  return x / (1.0 + np.exp(-x))


def _gelu_tanh(x):
  return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def _modulate(x, shift, scale):
  return x * (1.0 + scale) + shift


def _sinusoid(pos, dim):
  half = dim // 2
  freqs = np.exp(-math.log(10000.0) * np.arange(half) / half)
  args = np.asarray(pos, np.float64)[..., None] * freqs
  return np.concatenate([np.cos(args), np.sin(args)], -1)


def _heads(x):
  b, n, e = x.shape
  return x.reshape(b, n, HEADS, e // HEADS)


def _rope(x, pos):  # x [B, N, h, d]
  d = x.shape[-1]
  inv = 1.0 / 10000.0 ** (np.arange(0, d, 2) / d)
  f = np.asarray(pos, np.float64)[..., None] * inv
  emb = np.concatenate([f, f], -1)[:, :, None, :]
  x1, x2 = x[..., :d // 2], x[..., d // 2:]
  return x * np.cos(emb) + np.concatenate([-x2, x1], -1) * np.sin(emb)


def _attention(q, k, v, allowed):  # q [B,Q,h,d], allowed [B,Q,K]; empty rows -> 0
  s = np.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
  a = allowed[:, None]
  s = np.where(a, s, -np.inf)
  m = np.max(np.where(a, s, -1e300), -1, keepdims=True)
  p = np.where(a, np.exp(s - m), 0.0)
  den = p.sum(-1, keepdims=True)
  p = np.where(den > 0, p / np.where(den > 0, den, 1.0), 0.0)
  o = np.einsum("bhqk,bkhd->bqhd", p, v)
  return o.reshape(o.shape[0], o.shape[1], -1)


def _cond(sd, batch):
  freq = _sinusoid(np.zeros(batch), 256)          # sigma = 0
  h = _silu(_linear(sd, "sigma_map.mlp.0", freq))
  return _silu(_linear(sd, "sigma_map.mlp.2", h))  # [B, C]


def _dit_block_ref(sd, p, x, c, pos, allowed):
  mods = _linear(sd, p + "adaLN_modulation", c)[:, None, :]
  sh_a, sc_a, g_a, sh_m, sc_m, g_m = np.split(mods, 6, -1)
  h = _modulate(_ln(x, sd[p + "norm1.weight"]), sh_a, sc_a)
  q, k, v = np.split(_linear(sd, p + "attn_qkv", h, bias=False), 3, -1)
  att = _attention(_rope(_heads(q), pos), _rope(_heads(k), pos), _heads(v), allowed)
  x = x + g_a * _linear(sd, p + "attn_out", att, bias=False)
  h = _modulate(_ln(x, sd[p + "norm2.weight"]), sh_m, sc_m)
  h = _linear(sd, p + "mlp.2", _gelu_tanh(_linear(sd, p + "mlp.0", h)))
  return x + g_m * h


def _final_ref(sd, x, c):
  shift, scale = np.split(_linear(sd, "output_layer.adaLN_modulation", c)[:, None, :], 2, -1)
  h = _modulate(_ln(x, sd["output_layer.norm_final.weight"]), shift, scale)
  return _linear(sd, "output_layer.linear", h)


def ref_mdlm(sd, tokens):
  """MDLM DiT: full (bidirectional) attention at positions 0..L-1."""
  sd = _f64(sd)
  b, n = tokens.shape
  x = sd["vocab_embed.embedding"][tokens]
  c = _cond(sd, b)
  pos = np.broadcast_to(np.arange(n), (b, n))
  allowed = np.ones((b, n, n), bool)
  for i in range(MDLM_LAYERS):
    x = _dit_block_ref(sd, f"blocks.{i}.", x, c, pos, allowed)
  return _final_ref(sd, x, c)


def ref_pgm(sd, query_mode, enc_tokens, enc_pos, enc_allowed, q_pos, cross_allowed):
  """Encoder on enc_tokens (mask enc_allowed), decoder queries at q_pos reading the
  encoder outputs that cross_allowed [B, Q, K] permits."""
  sd = _f64(sd)
  b = enc_tokens.shape[0]
  c = _cond(sd, b)
  x = sd["vocab_embed.embedding"][enc_tokens]
  for i in range(ENC):
    x = _dit_block_ref(sd, f"encoder.blocks.{i}.", x, c, enc_pos, enc_allowed)
  enc = x
  # GroupSwap
  g = "decoder.group_swap."
  nq = q_pos.shape[1]
  q_pre = np.broadcast_to(sd[g + "base_embedding"][None], (b, nq, H)).copy()
  if "freqs" in query_mode:
    q_pre = q_pre + _sinusoid(q_pos, H)
  if query_mode.endswith(("+mean", "+logsumexp")):
    agg = np.zeros((b, nq, H))
    for bi in range(b):
      for qi in range(nq):
        sel = enc[bi, cross_allowed[bi, qi]]
        if len(sel) == 0:
          continue
        if query_mode.endswith("+mean"):
          agg[bi, qi] = sel.mean(0)
        else:
          m = sel.max(0)
          agg[bi, qi] = m + np.log(np.exp(sel - m).sum(0))
    q_pre = q_pre + agg
  q = _linear(sd, g + "query_processor",
              _ln(q_pre, sd[g + "pre_query_norm.weight"], sd[g + "pre_query_norm.bias"]))
  k, v = np.split(_linear(sd, g + "hidden_to_key_value", enc), 2, -1)
  att = _attention(_rope(_heads(q), q_pos), _rope(_heads(k), enc_pos), _heads(v), cross_allowed)
  x = _linear(sd, g + "output_linear", att)
  # Decoder layers (cross-attention only)
  for j in range(DEC):
    p = f"decoder.layers.{j}."
    mods = _linear(sd, p + "adaLN_modulation", c)[:, None, :]
    sh_a, sc_a, g_a, sh_m, sc_m, g_m = np.split(mods, 6, -1)
    xq = _modulate(_ln(x, sd[p + "q_norm1.weight"]), sh_a, sc_a)
    q = _linear(sd, p + "attn_q", xq, bias=False)
    k, v = np.split(_linear(sd, p + "attn_kv", _ln(enc, sd[p + "kv_norm1.weight"]), bias=False),
                    2, -1)
    att = _attention(_rope(_heads(q), q_pos), _rope(_heads(k), enc_pos), _heads(v),
                     cross_allowed)
    x = x + g_a * _linear(sd, p + "attn_out", att, bias=False)
    h = _modulate(_ln(x, sd[p + "norm2.weight"]), sh_m, sc_m)
    h = _linear(sd, p + "mlp.2", _gelu_tanh(_linear(sd, p + "mlp.0", h)))
    x = x + g_m * h
  return _final_ref(sd, x, c)


def ref_pgm_training(sd, query_mode, tokens, group):
  b, n = tokens.shape
  pos = np.broadcast_to(np.arange(n), (b, n))
  same = group[:, :, None] == group[:, None, :]
  return ref_pgm(sd, query_mode, tokens, pos, same, pos, ~same)


# ----------------------------------------------------------------------------
# Fixtures.
# ----------------------------------------------------------------------------

def write_vocab(path, size=V):
  words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
  words += [f"w{i}" for i in range(size - len(words))]
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(words) + "\n")
  return str(path)


def tiny_config(vocab_path, kind, query_mode="learn+freqs+mean"):
  cfg = load_config("shakespeare", "tiny")
  cfg.data.tokenizer = "bert_wordpiece"
  cfg.data.tokenizer_path = vocab_path
  cfg.model.kind = kind
  cfg.model.hidden, cfg.model.num_heads, cfg.model.cond_dim = H, HEADS, C
  cfg.model.enc_layers, cfg.model.dec_layers, cfg.model.num_layers = ENC, DEC, MDLM_LAYERS
  cfg.model.query_mode = query_mode
  cfg.model.dtype = "float32"
  cfg.model.dropout = 0.0
  return cfg


def restore_full(config, workdir):
  setup = experiment.make_setup(config)
  manager = checkpointing.make_manager(checkpointing.checkpoint_dir(workdir), read_only=True)
  step = manager.latest_step()
  state, _ = checkpointing.restore(manager, step, setup.abstract_state)
  manager.close()
  return setup, step, state


def rel_err(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def _random_groups(rng):
  group = rng.integers(0, 2, (B, L)).astype(np.int32)
  group[0, :2] = [0, 1]
  group[1] = 0                       # group 1 empty: every cross-attention row of group 0 is
  return group                       # empty, and the other-group aggregate is 0


def _assert_close(got, want, what):
  err = rel_err(got, want)
  assert err < 1e-5, f"{what}: relative error {err:.3g}"


# ----------------------------------------------------------------------------
# Logits: converted checkpoint vs the NumPy reference.
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("query_mode", ["learn+freqs", "learn+freqs+logsumexp"])
@pytest.mark.slow
def test_pgm_logits_match_reference(tmp_path, query_mode):
  cfg = tiny_config(write_vocab(tmp_path / "vocab.txt"), "pgm", query_mode)
  raw = random_weights(pgm_layout(), seed=0)
  ema = random_weights(pgm_layout(), seed=1)
  ckpt = tmp_path / "last.ckpt"
  save_lightning(ckpt, raw, ema, step=77)
  info = convert.convert(cfg, str(ckpt), str(tmp_path / "wd"), log=lambda *_: None)
  assert info["step"] == 77 and info["where"] == "params <- raw, ema_params <- EMA"

  setup, step, state = restore_full(cfg, str(tmp_path / "wd"))
  assert step == 77 and int(state.step) == 77
  eval_step, eval_params = experiment.restore_eval_params(setup, str(tmp_path / "wd"))
  assert eval_step == 77
  model = setup.model
  rng = np.random.default_rng(5)
  tokens = rng.integers(0, V, (B, L)).astype(np.int32)
  group = _random_groups(rng)

  # Training layout: raw weights -> params, EMA weights -> ema_params.
  for params, weights, what in ((state.params, raw, "raw"), (eval_params, ema, "ema")):
    got = model.apply({"params": params}, tokens, group)
    want = ref_pgm_training(weights, query_mode, tokens, group)
    _assert_close(got, want, f"training layout ({what})")
    if query_mode == "learn+freqs" and what == "raw":
      got_sorted = model.apply({"params": params}, tokens, group, sorted_layout=True)
      _assert_close(got_sorted, want, "group-sorted training layout")

  # Packed inference layout: clean tokens packed left (junk padding), queries padded.
  want_full = ref_pgm_training(ema, query_mode, tokens, group)
  n_max, q_max = L, L
  clean_tok, clean_pos, lens, q_pos = [], [], [], []
  for b in range(B):
    pos, qs = np.flatnonzero(group[b] == 0), np.flatnonzero(group[b] == 1)
    clean_tok.append(np.pad(tokens[b, pos], (0, n_max - len(pos)), constant_values=7))
    clean_pos.append(np.pad(pos, (0, n_max - len(pos)), constant_values=3))
    lens.append(len(pos))
    q_pos.append(np.pad(qs, (0, q_max - len(qs)), constant_values=1))
  clean_tok, clean_pos = np.stack(clean_tok).astype(np.int32), np.stack(clean_pos)
  q_pos, lens = np.stack(q_pos), np.asarray(lens)
  mask = AttentionMask.packed(jax.numpy.asarray(lens), n_max)
  enc = model.apply({"params": eval_params}, clean_tok, clean_pos, mask, method="encode")
  got = model.apply({"params": eval_params}, enc, clean_pos, q_pos, mask, method="decode")
  valid_k = np.arange(n_max)[None, :] < lens[:, None]
  enc_allowed = np.broadcast_to(valid_k[:, None, :], (B, n_max, n_max))
  cross_allowed = np.broadcast_to(valid_k[:, None, :], (B, q_max, n_max))
  want = ref_pgm(ema, query_mode, clean_tok, clean_pos, enc_allowed, q_pos, cross_allowed)
  nq = [(group[b] == 1).sum() for b in range(B)]
  assert nq[1] == 0                   # example 1 has nothing to decode
  for b in (0, 2):
    _assert_close(np.asarray(got)[b, :nq[b]], want[b, :nq[b]], f"packed layout, example {b}")
    qs = np.flatnonzero(group[b] == 1)
    # the packed reference agrees with the training-layout reference
    np.testing.assert_allclose(want[b, :nq[b]], want_full[b, qs], rtol=1e-9, atol=1e-9)


def test_pgm_mean_query_mode_in_process(pgm_setup):
  """learn+freqs+mean (pgm_setup's config), converted in process, training layout."""
  _, cfg, setup = pgm_setup
  assert cfg.model.query_mode == "learn+freqs+mean"
  raw = random_weights(pgm_layout(), seed=8)
  params, _, _ = convert.convert_weights(_loaded(raw), setup.abstract_state.params,
                                         setup.model_cfg.head_dim)
  rng = np.random.default_rng(9)
  tokens = rng.integers(0, V, (B, L)).astype(np.int32)
  group = _random_groups(rng)
  got = setup.model.apply({"params": params}, tokens, group)
  _assert_close(got, ref_pgm_training(raw, "learn+freqs+mean", tokens, group), "+mean")


def test_mdlm_logits_match_reference(tmp_path):
  cfg = tiny_config(write_vocab(tmp_path / "vocab.txt"), "mdlm")
  raw = random_weights(mdlm_layout(), seed=2)
  ema = random_weights(mdlm_layout(), seed=3)
  ckpt = tmp_path / "mdlm.ckpt"
  save_lightning(ckpt, raw, ema, step=5)
  convert.convert(cfg, str(ckpt), str(tmp_path / "wd"), log=lambda *_: None)
  setup, step, state = restore_full(cfg, str(tmp_path / "wd"))
  assert step == 5
  tokens = np.random.default_rng(6).integers(0, V, (B, L)).astype(np.int32)
  for params, weights, what in ((state.params, raw, "raw"), (state.ema_params, ema, "ema")):
    got = setup.model.apply({"params": params}, tokens)
    _assert_close(got, ref_mdlm(weights, tokens), f"mdlm ({what})")


# ----------------------------------------------------------------------------
# Formats, options and safety.
# ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pgm_setup(tmp_path_factory):
  d = tmp_path_factory.mktemp("pgm_setup")
  cfg = tiny_config(write_vocab(d / "vocab.txt"), "pgm")
  return d, cfg, experiment.make_setup(cfg)


def _convert_in_process(setup, loaded, **kw):
  return convert.convert_weights(loaded, setup.abstract_state.params, setup.model_cfg.head_dim,
                                 **kw)


_RAN = []


def _record_call(tag):
  _RAN.append(tag)
  return {"tag": tag}


class _RunsCodeWhenUnpickled:
  """Stands for a Lightning checkpoint's non-tensor objects (OmegaConf hparams...)."""

  def __reduce__(self):
    return (_record_call, ("unpickled",))


def test_safe_loader_does_not_run_code_from_the_file(pgm_setup):
  d, _, setup = pgm_setup
  raw = random_weights(pgm_layout(), seed=0)
  path = d / "hparams.ckpt"
  save_lightning(path, raw, raw, extra={"hyper_parameters": {"config": _RunsCodeWhenUnpickled()}})
  _RAN.clear()
  loaded = convert.load_checkpoint(str(path))
  assert not _RAN, "the safe loader ran code from the checkpoint"
  assert any(name.endswith("_record_call") for name in loaded.placeholders)
  assert loaded.global_step == 123
  params, ema, info = _convert_in_process(setup, loaded)
  np.testing.assert_array_equal(params["encoder"]["blocks_1"]["attn_qkv"]["kernel"],
                                raw["encoder.blocks.1.attn_qkv.weight"].T)
  assert info["buffers"] == ["rotary_emb.inv_freq"]
  # --unsafe_pickle really unpickles (and so runs the file's code).
  convert.load_checkpoint(str(path), unsafe_pickle=True)
  assert _RAN == ["unpickled"]


def test_plain_state_dict_and_safetensors(pgm_setup):
  d, _, setup = pgm_setup
  raw = random_weights(pgm_layout(), seed=0)
  ema = random_weights(pgm_layout(), seed=1)
  # Plain state dict without prefix, bf16 tensors (converted through float32).
  plain = d / "plain.pt"
  torch.save({k: torch.from_numpy(v.copy()).to(torch.bfloat16) if "mlp" in k
              else torch.from_numpy(v.copy()) for k, v in raw.items()}, plain)
  params, ema_params, info = _convert_in_process(setup, convert.load_checkpoint(str(plain)))
  assert "no EMA" in info["where"]
  want = torch.from_numpy(raw["decoder.layers.0.mlp.0.weight"]).to(torch.bfloat16).float()
  np.testing.assert_array_equal(params["decoder"]["layers_0"]["mlp"]["fc_0"]["kernel"],
                                want.numpy().T)
  np.testing.assert_array_equal(ema_params["vocab_embed"]["embedding"],
                                raw["vocab_embed.embedding"])
  # safetensors with `backbone.` names and EMA under `ema.`.
  st = pytest.importorskip("safetensors.numpy")
  path = d / "model.safetensors"
  tensors = {f"backbone.{k}": v for k, v in raw.items()}
  tensors.update({f"ema.backbone.{k}": v for k, v in ema.items() if "inv_freq" not in k})
  st.save_file(tensors, str(path))
  loaded = convert.load_checkpoint(str(path))
  params, ema_params, info = _convert_in_process(setup, loaded)
  assert info["where"] == "params <- raw, ema_params <- EMA"
  for p, w in ((params, raw), (ema_params, ema)):
    np.testing.assert_array_equal(p["decoder"]["group_swap"]["hidden_to_key_value"]["kernel"],
                                  w["decoder.group_swap.hidden_to_key_value.weight"].T)
    np.testing.assert_array_equal(p["sigma_map"]["mlp_2"]["bias"], w["sigma_map.mlp.2.bias"])
    np.testing.assert_array_equal(p["decoder"]["group_swap"]["pre_query_norm"]["scale"],
                                  w["decoder.group_swap.pre_query_norm.weight"])
  p_ema, e_ema, _ = _convert_in_process(setup, loaded, ema_only=True)
  p_raw, e_raw, _ = _convert_in_process(setup, loaded, raw_only=True)
  emb = "decoder.group_swap.base_embedding"
  np.testing.assert_array_equal(p_ema["decoder"]["group_swap"]["base_embedding"], ema[emb])
  np.testing.assert_array_equal(e_raw["decoder"]["group_swap"]["base_embedding"], raw[emb])


def _loaded(raw, ema=None):
  obj = {"state_dict": {f"backbone.{k}": torch.from_numpy(v.copy()) for k, v in raw.items()},
         "global_step": 3}
  if ema is not None:
    obj["ema"] = {"shadow_params": [torch.from_numpy(v.copy()) for v in ema]}
  return convert.interpret(obj, "test")


def _one_line_error(setup, loaded):
  with pytest.raises(convert.ConvertError) as e:
    _convert_in_process(setup, loaded)
  message = str(e.value)
  assert "\n" not in message
  return message


def test_missing_unexpected_and_wrong_shapes(pgm_setup):
  _, _, setup = pgm_setup
  raw = random_weights(pgm_layout(), seed=0)

  bad = dict(raw)
  del bad["decoder.group_swap.base_embedding"]
  bad["encoder.blocks.7.norm1.weight"] = np.ones(H, np.float32)
  msg = _one_line_error(setup, _loaded(bad))
  assert "missing keys [decoder.group_swap.base_embedding]" in msg
  assert "unexpected keys [encoder.blocks.7.norm1.weight]" in msg

  bad = dict(raw)
  bad["decoder.layers.1.attn_kv.weight"] = np.zeros((3 * H, H), np.float32)
  msg = _one_line_error(setup, _loaded(bad))
  assert "decoder.layers.1.attn_kv.weight" in msg and f"({3 * H}, {H})" in msg
  assert f"({2 * H}, {H})" in msg

  bad = dict(raw)
  bad["rotary_emb.inv_freq"] = bad["rotary_emb.inv_freq"] * 2
  assert "rotary_emb.inv_freq" in _one_line_error(setup, _loaded(bad))

  params = [v for k, v in raw.items() if "inv_freq" not in k]
  assert "shadow_params has" in _one_line_error(setup, _loaded(raw, params[:-1]))
  swapped = params[1:2] + params[:1] + params[2:]     # not in parameters() order
  assert "ema.shadow_params" in _one_line_error(setup, _loaded(raw, swapped))


def _run(args, **kw):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", *args], cwd=REPO_ROOT, env=env,
                        capture_output=True, text=True, timeout=300, **kw)


@pytest.mark.slow
@pytest.mark.subprocess
def test_cli_error_is_one_line(tmp_path):
  vocab = write_vocab(tmp_path / "vocab.txt")
  layout = pgm_layout(enc=3)          # one encoder block more than the config
  raw = random_weights(layout, seed=0)
  save_lightning(tmp_path / "x.ckpt", raw, raw)
  r = _run(["pgm_jax.tools.convert", f"--from={tmp_path / 'x.ckpt'}", f"--to={tmp_path / 'wd'}",
            "--config=configs/shakespeare.py:tiny", "--config.data.tokenizer=bert_wordpiece",
            f"--config.data.tokenizer_path={vocab}", f"--config.model.hidden={H}",
            f"--config.model.cond_dim={C}", f"--config.model.enc_layers={ENC}",
            f"--config.model.dec_layers={DEC}"])
  assert r.returncode == 1, r.stderr[-2000:]
  lines = [l for l in r.stderr.splitlines() if l.startswith("pgm_jax.tools.convert: error:")]
  assert len(lines) == 1, r.stderr[-2000:]
  assert "unexpected keys [encoder.blocks.2.norm1.weight" in lines[0]
  assert not os.path.exists(tmp_path / "wd" / "checkpoints")


@pytest.mark.slow
@pytest.mark.subprocess
def test_cli_converts_and_eval_restores(tmp_path):
  """configs/shakespeare.py:tiny (V = 2049, H = 64, 1 + 1 layers) through both CLIs."""
  cfg = load_config("shakespeare", "tiny")
  m = cfg.model
  layout = pgm_layout(v=2049, h=m.hidden, c=m.cond_dim, heads=m.num_heads, enc=m.enc_layers,
                      dec=m.dec_layers)
  raw = random_weights(layout, seed=4, heads=m.num_heads)
  ema = {k: v * 0.5 for k, v in raw.items()}
  save_lightning(tmp_path / "tiny.ckpt", raw, ema, step=40)
  wd = tmp_path / "wd"
  r = _run(["pgm_jax.tools.convert", f"--from={tmp_path / 'tiny.ckpt'}", f"--to={wd}",
            "--config=configs/shakespeare.py:tiny"])
  assert r.returncode == 0, r.stderr[-3000:]
  assert "params <- raw, ema_params <- EMA" in r.stdout
  assert os.path.isdir(wd / "checkpoints" / "40")
  r = _run(["pgm_jax.main", "--config=configs/shakespeare.py:tiny", f"--workdir={wd}",
            "--mode=eval", "--config.eval.max_batches=1"])
  assert r.returncode == 0, r.stderr[-3000:]
  assert "val_ppl=" in r.stdout
  # Converting again into the same workdir refuses rather than shadowing a checkpoint.
  with pytest.raises(convert.ConvertError, match="already holds checkpoint 40"):
    convert.convert(cfg, str(tmp_path / "tiny.ckpt"), str(wd), log=lambda *_: None)


# ----------------------------------------------------------------------------
# LM1B as the reference scores it: pads are fed to the model, masked in the loss only.
# ----------------------------------------------------------------------------

def _log_softmax64(x):
  x = np.asarray(x, np.float64)
  m = np.max(np.where(np.isfinite(x), x, -1e300), -1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _padded_batch(rng):
  """[CLS] w... [SEP] [PAD]... rows of different lengths (vocab of `write_vocab`)."""
  tokens = np.zeros((B, L), np.int32)             # [PAD] = 0
  valid = np.zeros((B, L), bool)
  for b, n in enumerate((L, 7, 4)):
    tokens[b, :n] = np.concatenate([[2], rng.integers(5, V, n - 2), [3]])
    valid[b, :n] = True
  return tokens, valid


@pytest.mark.parametrize("kind", ["pgm", "mdlm"])
def test_lm1b_padded_batch_matches_reference_rule(tmp_path, kind):
  """Eval NLL of converted weights on a padded batch (attend_to_padding=True, the LM1B
  presets) equals the reference's rule: the full padded sequence through the network,
  pads in groups / noised like any token, and only valid tokens scored."""
  from pgm_jax import steps  # pylint: disable=g-import-not-at-top
  cfg = tiny_config(write_vocab(tmp_path / "vocab.txt"), kind, "learn+freqs")
  cfg.data.attend_to_padding = True
  assert load_config("lm1b", "pgm").data.attend_to_padding     # the presets' default
  setup = experiment.make_setup(cfg)
  layout = pgm_layout() if kind == "pgm" else mdlm_layout()
  raw = random_weights(layout, seed=11)
  params, _, _ = convert.convert_weights(_loaded(raw), setup.abstract_state.params,
                                         setup.model_cfg.head_dim)
  rng = np.random.default_rng(12)
  tokens, valid = _padded_batch(rng)
  t = np.array([0.3, 0.6, 0.9], np.float32)
  u = rng.random((B, L)).astype(np.float32)
  group = u < (1 - 1e-3) * t[:, None]
  mask_id = setup.mask_id

  def nll_sum(attend_to_padding):
    return float(steps.loss_terms(
        params, {"tokens": tokens, "valid": valid}, t, u, None, model=setup.model,
        mask_id=mask_id, train=False, sampling_eps=1e-3,
        attend_to_padding=attend_to_padding).nll_sum)

  if kind == "pgm":
    logits = ref_pgm_training(raw, "learn+freqs", tokens, group.astype(np.int32))
    logits[..., mask_id] = -np.inf
    scored = group
  else:
    x_t = np.where(group, mask_id, tokens)
    logits = ref_mdlm(raw, x_t)
    logits[..., mask_id] = -1e6
    scored = group                       # SUBS carry-over: unmasked positions score 0
  logp = np.take_along_axis(_log_softmax64(logits), tokens[..., None], -1)[..., 0]
  want = np.sum(np.where(scored & valid, -logp / t[:, None], 0.0))
  got = nll_sum(True)
  assert abs(got - want) / abs(want) < 1e-5, (got, want)
  # Masking pads out of the attention (attend_to_padding=False) is a different function.
  assert abs(nll_sum(False) - want) / abs(want) > 1e-3


def test_convert_refuses_mismatched_time_conditioning(pgm_setup):
  d, _, _ = pgm_setup
  raw = random_weights(mdlm_layout(), seed=0)
  path = d / "tc.ckpt"
  # OmegaConf-like hyper-parameters: unknown classes load as placeholders (code never runs).
  algo = _ConfigLike({"name": "mdlm", "time_conditioning": _NodeLike(True)})
  save_lightning(path, raw, raw, extra={"hyper_parameters": {"config": _ConfigLike(
      {"algo": algo, "model": _ConfigLike({"length": 128})})}})
  loaded = convert.load_checkpoint(str(path))
  assert loaded.time_conditioning is True
  cfg = load_config("shakespeare", "tiny,mdlm")
  with pytest.raises(convert.ConvertError, match="config.model.time_conditioning=True"):
    convert.check_time_conditioning(loaded, cfg)
  cfg.model.time_conditioning = True
  assert "agree" in convert.check_time_conditioning(loaded, cfg)
  plain = convert.interpret({"state_dict": {}, "hyper_parameters": {"config": {
      "algo": {"time_conditioning": False}}}}, "test")
  assert plain.time_conditioning is False
  with pytest.raises(convert.ConvertError, match="time_conditioning=False"):
    convert.check_time_conditioning(plain, cfg)


class _ConfigLike:
  """Pickles like an OmegaConf DictConfig: its items live in `_content`."""

  def __init__(self, content):
    self._content = content


class _NodeLike:
  def __init__(self, val):
    self._val = val


# ----------------------------------------------------------------------------
# The authors' image checkpoints (branch image_pretrain: trainer/abstract_trainer.py
# `save_network` writes {'iter', 'global_epoch', 'model_state_dict', 'optimizer_state_dict'}
# with torch.save). Names and registration order from models/encoder_decoder.py
# (`PartitionDIT`) and models/transformer.py (`Transformer`), written out here.
# ----------------------------------------------------------------------------

def image_pgm_layout(v, h, heads, enc, dec, classes, register):
  """PartitionDIT: vocab_embed, cls_embed (LabelEmbedder: embedding_table), rotary_emb
  (buffer), encoder, decoder, output_layer (cond_dim = H), reg_tokens (nn.Embedding)."""
  names = [("vocab_embed.embedding", (v, h)),
           ("cls_embed.embedding_table.weight", (classes + 1, h)),
           ("rotary_emb.inv_freq", (h // heads // 2,))]
  names += [(n, s) for n, s in pgm_layout(v=v, h=h, c=h, heads=heads, enc=enc, dec=dec)
            if n.startswith(("encoder.", "decoder.", "output_layer."))]
  return names + [("reg_tokens.weight", (register, h))]


def maskgit_layout(v, h, layers, positions, classes, register, ffn):
  """Transformer: cls_emb, tok_emb, pos_emb (nn.Embedding), transformer.layers (adaLN
  mlp = Sequential(SiLU, Linear) -> mlp.1, ln1, attn.w{q,k,v,o}, ln2, ff.w{1,2,3}),
  last_norm (AdaNorm), head (Linear, weight tied to tok_emb), reg_tokens."""
  names = [("cls_emb.weight", (classes + 1, h)), ("tok_emb.weight", (v, h)),
           ("pos_emb.weight", (positions, h))]
  for i in range(layers):
    p = f"transformer.layers.{i}."
    names += [(p + "mlp.1.weight", (6 * h, h)), (p + "mlp.1.bias", (6 * h,)),
              (p + "ln1.weight", (h,))]
    names += [(p + f"attn.{w}.weight", (h, h)) for w in ("wq", "wk", "wv", "wo")]
    names += [(p + "ln2.weight", (h,)), (p + "ff.w1.weight", (ffn, h)),
              (p + "ff.w2.weight", (h, ffn)), (p + "ff.w3.weight", (ffn, h))]
  return names + [("last_norm.norm_final.weight", (h,)), ("last_norm.norm_final.bias", (h,)),
                  ("last_norm.mlp.1.weight", (2 * h, h)), ("last_norm.mlp.1.bias", (2 * h,)),
                  ("head.weight", (v, h)), ("head.bias", (v,)),
                  ("reg_tokens.weight", (register, h))]


_IMAGE_SPECIAL = {
    "cls_embed.embedding_table.weight": ("cls_embed", "embedding"),
    "reg_tokens.weight": ("reg_tokens",),
    "cls_emb.weight": ("cls_emb", "embedding"), "tok_emb.weight": ("tok_emb",),
    "pos_emb.weight": ("pos_emb",), "head.weight": ("tok_emb",), "head.bias": ("head_bias",),
}


def _our_path(name, shape):
  """Our Flax path of an authors' name, and whether the tensor is transposed."""
  if name in _IMAGE_SPECIAL:
    return _IMAGE_SPECIAL[name], False
  *parts, leaf = name.split(".")
  path, i = [], 0
  while i < len(parts):
    p = parts[i]
    if p in ("blocks", "layers"):
      path.append(f"{p}_{parts[i + 1]}")
      i += 2
    elif p == "mlp" and parts[0] == "transformer" or parts[:1] == ["last_norm"] and p == "mlp":
      path.append(f"mlp_{parts[i + 1]}")         # MaskGIT Sequential(SiLU, Linear): mlp.1
      i += 2
    elif p == "mlp":
      path += ["mlp", f"fc_{parts[i + 1]}"]      # DDiT MLP: mlp.{0,2}
      i += 2
    else:
      path.append(p)
      i += 1
  if leaf == "weight":
    return tuple(path) + (("kernel",) if len(shape) == 2 else ("scale",)), len(shape) == 2
  return tuple(path) + (leaf,), False


def _leaves(tree):
  return {tuple(str(getattr(k, "key", k)) for k in p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _image_setup(preset):
  cfg = load_config("digits", preset)
  cfg.model.dropout = 0.0
  return cfg, experiment.make_setup(cfg)


def _image_layout(setup, cfg):
  m, mc = cfg.model, setup.model_cfg
  if setup.model_cfg.num_positions and "tok_emb" in setup.abstract_state.params:
    from pgm_jax.models.maskgit import swiglu_hidden
    return maskgit_layout(mc.vocab_size, m.hidden, m.num_layers, mc.num_positions,
                          m.num_classes, m.register, swiglu_hidden(mc.mlp_ratio * m.hidden))
  return image_pgm_layout(mc.vocab_size, m.hidden, m.num_heads, m.enc_layers, m.dec_layers,
                          m.num_classes, m.register)


def _random_params(setup, seed):
  """Random values for every parameter of the model (shaped as `model.init` would; norm
  scales around 1)."""
  rng = np.random.default_rng(seed)

  def draw(path, x):
    base = 1.0 if _path_str(path).endswith("scale") else 0.0
    return (base + 0.2 * rng.standard_normal(x.shape)).astype(np.float32)
  return jax.tree_util.tree_map_with_path(draw, setup.abstract_state.params)


def _path_str(path):
  return "/".join(str(getattr(k, "key", k)) for k in path)


def authors_state_dict(setup, cfg, params):
  """Our parameters under the authors' names and layout (a torch state dict)."""
  leaves = _leaves(params)
  used, sd = set(), {}
  for name, shape in _image_layout(setup, cfg):
    if name.endswith("inv_freq"):
      d = 2 * shape[0]
      sd[name] = torch.from_numpy((1.0 / 10000 ** (np.arange(0, d, 2) / d)).astype(np.float32))
      continue
    if name == "head.weight":
      sd[name] = sd["tok_emb.weight"]            # tied: the same tensor
      continue
    path, transpose = _our_path(name, shape)
    arr = leaves[path].T if transpose else leaves[path]
    assert arr.shape == shape, (name, arr.shape, shape)
    sd[name] = torch.from_numpy(np.ascontiguousarray(arr))
    used.add(path)
  assert used == set(leaves), set(leaves) ^ used
  return sd


def save_authors_image(path, sd, it=7):
  torch.save({"iter": it, "global_epoch": 1, "model_state_dict": sd,
              "optimizer_state_dict": None}, path)


def _canvas(setup, seed):
  """[BOS] + codes with some MASK, and labels (the null class included)."""
  mc = setup.model_cfg
  rng = np.random.default_rng(seed)
  n = setup.config.data.grid ** 2
  codes = rng.integers(0, setup.config.data.num_codes, (B, n)).astype(np.int32)
  codes[rng.random((B, n)) < 0.5] = mc.mask_id
  canvas = np.concatenate([np.full((B, 1), setup.config.data.num_codes + 1, np.int32), codes],
                          1)
  return canvas, np.asarray([0, 3, setup.config.model.num_classes][:B], np.int32)


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["pgm,tiny", "maskgit,tiny"])
def test_authors_image_checkpoint_round_trip(tmp_path, preset):
  """Our random parameters written as the authors' .ckpt (model_state_dict) convert back to
  the same parameters and the same logits; `iter` becomes the step."""
  cfg, setup = _image_setup(preset)
  params = _random_params(setup, seed=1)
  path = tmp_path / "authors.ckpt"
  save_authors_image(path, authors_state_dict(setup, cfg, params))
  lines = []
  info = convert.convert(cfg, str(path), str(tmp_path / "wd"), log=lines.append)
  assert "model_state_dict" in lines[0]
  assert info["ignored"] == ["global_epoch"]
  _, step, state = restore_full(cfg, str(tmp_path / "wd"))
  assert step == 7
  want = _leaves(params)
  for tree in (state.params, state.ema_params):
    got = _leaves(tree)
    assert set(got) == set(want)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg="/".join(k))
  step, eval_params = experiment.restore_eval_params(setup, str(tmp_path / "wd"))
  canvas, labels = _canvas(setup, seed=2)
  logits = lambda p: np.asarray(setup.model.apply({"params": p}, canvas, labels,
                                                  method="canvas_logits"))
  np.testing.assert_array_equal(logits(eval_params), logits(params))
  assert os.path.isfile(tmp_path / "wd" / "config.json")


@pytest.fixture(scope="module")
def image_setups(tmp_path_factory):
  """{preset: (config, setup, random parameters, them as the authors' state dict)}."""
  out = {}
  for preset in ("pgm,tiny", "maskgit,tiny"):
    cfg, setup = _image_setup(preset)
    params = _random_params(setup, seed=3)
    out[preset] = (cfg, setup, params, authors_state_dict(setup, cfg, params))
  return tmp_path_factory.mktemp("image"), out


def _image_error(path, setup):
  """The one-line error of converting `path` for `setup` (in process, nothing written)."""
  with pytest.raises(convert.ConvertError) as e:
    convert.convert_weights(convert.load_checkpoint(str(path)), setup.abstract_state.params,
                            setup.model_cfg.head_dim, family=setup.family)
  message = str(e.value)
  assert "\n" not in message, message
  return message


def test_authors_image_checkpoint_in_process(image_setups):
  """The round trip without Orbax: the .ckpt read safely, mapped back to our parameters,
  logits equal."""
  d, setups = image_setups
  for preset, (cfg, setup, ours, sd) in setups.items():
    path = d / f"{preset.split(',')[0]}.ckpt"
    save_authors_image(path, sd, it=11)
    loaded = convert.load_checkpoint(str(path))
    assert loaded.global_step == 11 and loaded.ema is None and loaded.ema_list is None
    params, ema, info = convert.convert_weights(loaded, setup.abstract_state.params,
                                                setup.model_cfg.head_dim, family=setup.family)
    assert info["tied"] == (["head.weight"] if "maskgit" in preset else [])
    assert info["buffers"] == ([] if "maskgit" in preset else ["rotary_emb.inv_freq"])
    want = _leaves(ours)
    for tree in (params, ema):
      got = _leaves(tree)
      assert set(got) == set(want)
      for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg="/".join(k))
    canvas, labels = _canvas(setup, seed=4)
    logits = jax.jit(lambda p, c=canvas, y=labels, m=setup.model: m.apply(
        {"params": p}, c, y, method="canvas_logits"))
    np.testing.assert_array_equal(logits(ema), logits(ours))


def test_authors_image_checkpoint_refusals(image_setups):
  """Every refused image file is one line saying which model the file looks like and what
  is missing or wrong."""
  d, setups = image_setups
  _, pgm_setup_, _, pgm_sd = setups["pgm,tiny"]
  _, mg_setup, _, mg_sd = setups["maskgit,tiny"]

  path = d / "no_registers.ckpt"
  save_authors_image(path, {k: v for k, v in pgm_sd.items() if k != "reg_tokens.weight"})
  msg = _image_error(path, pgm_setup_)
  assert msg.startswith(f"--from={path} looks like an image PGM checkpoint (PartitionDIT with "
                        "class embedding) but does not match the config: missing keys "
                        "[reg_tokens.weight]"), msg

  path = d / "maskgit.ckpt"                     # a MaskGIT file, the image PGM config
  save_authors_image(path, mg_sd)
  msg = _image_error(path, pgm_setup_)
  assert msg.startswith(f"--from={path} looks like a MaskGIT checkpoint (Halton-MaskGIT "
                        "Transformer), but --config builds config.model.kind='pgm_image': "
                        "pass a config with config.model.kind='maskgit', e.g. "
                        "configs/imagenet.py:maskgit ("), msg
  assert "names are missing: cls_embed.embedding_table.weight, " in msg

  path = d / "pgm.ckpt"                         # an image PGM file, the MaskGIT config
  save_authors_image(path, pgm_sd)
  assert "looks like an image PGM checkpoint (PartitionDIT with class embedding), but --config "\
         "builds config.model.kind='maskgit'" in _image_error(path, mg_setup)

  path = d / "text.ckpt"                        # a text PGM (Lightning), the image config
  raw = random_weights(pgm_layout(), seed=0)
  save_lightning(path, raw, raw)
  assert "looks like a text PGM checkpoint (PartitionDIT with sigma_map, no class embedding), "\
         "but --config builds config.model.kind='pgm_image'" in _image_error(path, pgm_setup_)

  path = d / "untied.ckpt"
  untied = dict(mg_sd, **{"head.weight": mg_sd["tok_emb.weight"] + 1})
  save_authors_image(path, untied)
  assert "head.weight should be tied to tok_emb.weight" in _image_error(path, mg_setup)

  path = d / "deeper.ckpt"                      # one encoder block more than the config
  deeper = dict(pgm_sd)
  deeper.update({k.replace("blocks.0.", "blocks.1."): v for k, v in pgm_sd.items()
                 if k.startswith("encoder.blocks.0.")})
  save_authors_image(path, deeper)
  msg = _image_error(path, pgm_setup_)
  assert "looks like an image PGM checkpoint" in msg
  assert "unexpected keys [encoder.blocks.1.norm1.weight" in msg

  path = d / "unknown.ckpt"
  save_authors_image(path, {"fc.weight": torch.zeros(2, 2)})
  msg = _image_error(path, pgm_setup_)
  assert "has the names of no known reference model" in msg and "MaskGIT" in msg

  path = d / "empty.ckpt"
  torch.save({"iter": 3, "global_epoch": 1}, path)
  assert "'model_state_dict'" in _image_error(path, pgm_setup_)


@pytest.mark.slow
@pytest.mark.subprocess
def test_cli_authors_image_checkpoint_then_sample(tmp_path, image_setups):
  """The CLI on the authors' image .ckpt: a MaskGIT file with the image PGM config is one
  error line; the image PGM file converts, and `--mode=sample` uses the workdir as is."""
  _, setups = image_setups
  for preset, name in (("pgm,tiny", "images_pgm.ckpt"), ("maskgit,tiny", "maskgit.ckpt")):
    save_authors_image(tmp_path / name, setups[preset][3], it=1000)
  config = "--config=configs/digits.py:pgm,tiny"
  r = _run(["pgm_jax.tools.convert", f"--from={tmp_path / 'maskgit.ckpt'}",
            f"--to={tmp_path / 'bad'}", config])
  assert r.returncode == 1, r.stderr[-2000:]
  lines = [l for l in r.stderr.splitlines() if l.startswith("pgm_jax.tools.convert: error:")]
  assert len(lines) == 1 and "looks like a MaskGIT checkpoint" in lines[0], r.stderr[-2000:]
  wd = tmp_path / "wd"
  r = _run(["pgm_jax.tools.convert", f"--from={tmp_path / 'images_pgm.ckpt'}", f"--to={wd}",
            config])
  assert r.returncode == 0, r.stderr[-3000:]
  assert "image trainer layout (model_state_dict)" in r.stdout
  assert "pgm_image: 39 tensors" in r.stdout and "step 1000" in r.stdout
  r = _run(["pgm_jax.main", config, f"--workdir={wd}", "--mode=sample"])
  assert r.returncode == 0, r.stderr[-3000:]
  assert os.path.isfile(wd / "samples.png") and os.path.isfile(wd / "samples.npz")
