"""Image models and objectives: parameter counts pinned to the reference, information flow,
packed inference, the sorted layout, the image losses, label dropout and the LR schedule."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special

from conftest import load_config, random_params
from pgm_jax import objectives, steps
from pgm_jax.models import ImagePartitionDiT, MaskGIT, ModelConfig
from pgm_jax.models.maskgit import swiglu_hidden
from pgm_jax.ops import AttentionMask

# ---------------------------------------------------------------------------
# Parameter counts vs the reference (computed from its module definitions).
# ---------------------------------------------------------------------------


def reference_pgm_image_count(h, vocab, num_classes, register, enc, dec, mlp=4):
  """Sum of the state-dict shapes of `image_pretrain/models/encoder_decoder.py::PartitionDIT`
  (adaLN=True, cond_dim = hidden, cross-only decoder, GroupSwap learn+freqs/linear/layernorm;
  `rotary_emb.inv_freq` and `pos_freqs` are buffers, not parameters):
    vocab_embed.embedding [V, H]; cls_embed.embedding_table.weight [C + 1, H];
    reg_tokens.weight [R, H];
    encoder.blocks.i: norm1 [H], attn_qkv [3H, H], attn_out [H, H], norm2 [H],
      mlp.0 [4H, H] + [4H], mlp.2 [H, 4H] + [H], adaLN_modulation [6H, H] + [6H];
    decoder.group_swap: base_embedding [1, H], pre_query_norm [H] + [H],
      query_processor [H, H] + [H], hidden_to_key_value [2H, H] + [2H],
      output_linear [H, H] + [H];
    decoder.layers.j: q_norm1, kv_norm1, norm2 [H] each, attn_q [H, H], attn_kv [2H, H],
      attn_out [H, H], mlp as above, adaLN_modulation [6H, H] + [6H];
    output_layer: norm_final [H], linear [V, H] + [V], adaLN_modulation [2H, H] + [2H].
  """
  mlp_params = (mlp * h * h + mlp * h) + (mlp * h * h + h)
  ada6 = 6 * h * h + 6 * h
  enc_block = h + 3 * h * h + h * h + h + mlp_params + ada6
  dec_block = 3 * h + h * h + 2 * h * h + h * h + mlp_params + ada6
  swap = h + 2 * h + (h * h + h) + (2 * h * h + 2 * h) + (h * h + h)
  out = h + (vocab * h + vocab) + (2 * h * h + 2 * h)
  return (vocab * h + (num_classes + 1) * h + register * h + enc * enc_block + dec * dec_block
          + swap + out)


def reference_maskgit_count(h, codebook, num_classes, depth, register, input_size, mlp_dim):
  """Sum of the state-dict shapes of `image_pretrain/models/transformer.py::Transformer`
  (proj = 1; the head's weight is tok_emb's, so it adds only its bias):
    cls_emb [C + 1, H]; tok_emb [codebook + 1, H]; pos_emb [input_size^2, H]; reg_tokens [R, H];
    transformer.layers.i: mlp.1 [6H, H] + [6H], ln1 [H], attn.wq/wk/wv/wo [H, H] (no bias,
      QKNorm without parameters), ln2 [H], ff.w1/w3 [F, H], ff.w2 [H, F] with
      F = 256 ceil(int(2 mlp_dim / 3) / 256);
    last_norm: norm_final weight + bias [H] each, mlp.1 [2H, H] + [2H]; head.bias [codebook + 1].
  """
  f = 256 * math.ceil(int(2 * mlp_dim / 3) / 256)
  block = (6 * h * h + 6 * h) + h + 4 * h * h + h + 3 * f * h
  return ((num_classes + 1) * h + (codebook + 1) * h + input_size ** 2 * h + register * h
          + depth * block + (2 * h + 2 * h * h + 2 * h) + (codebook + 1))


def _count(model, *args):
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *args))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


TOKENS = jnp.zeros((1, 8), jnp.int32)
LABELS = jnp.zeros((1,), jnp.int32)


@pytest.mark.parametrize("enc,dec,millions", [(12, 12, 494.2), (14, 10, 494.2)])
def test_pgm_image_parameter_counts_match_the_reference(enc, dec, millions):
  cfg = ModelConfig("pgm_image", 16386, 16384, hidden=1024, num_heads=16, cond_dim=1024,
                    enc_layers=enc, dec_layers=dec, num_classes=1000, register=2)
  ours = _count(ImagePartitionDiT(cfg), TOKENS, TOKENS, LABELS)
  assert ours == reference_pgm_image_count(1024, 16386, 1000, 2, enc, dec)
  assert round(ours / 1e6, 1) == millions


def test_maskgit_parameter_count_matches_the_reference():
  cfg = ModelConfig("maskgit", 16385, 16384, hidden=1024, num_heads=16, cond_dim=1024,
                    num_layers=24, num_classes=1000, register=1, num_positions=1024)
  ours = _count(MaskGIT(cfg), TOKENS[:, 1:], LABELS)
  assert ours == reference_maskgit_count(1024, 16384, 1000, 24, 1, 32, 4096)
  assert round(ours / 1e6, 1) == 480.4
  assert swiglu_hidden(4096) == 2816


def test_imagenet_presets_build_those_models():
  from pgm_jax.data import tokenizers  # pylint: disable=g-import-not-at-top
  from pgm_jax.families import model_config_from  # pylint: disable=g-import-not-at-top
  for preset, kind, vocab in (("pgm_14_10", "pgm_image", 16386), ("maskgit", "maskgit", 16385)):
    config = load_config("imagenet", preset)
    codes = tokenizers.get_tokenizer(config.data)
    assert (codes.mask_id, codes.bos_id, config.data.seq_len) == (16384, 16385, 1025)
    cfg = model_config_from(config, vocab_size=codes.vocab_size, mask_id=codes.mask_id)
    assert (cfg.kind, cfg.vocab_size, cfg.cond_dim, cfg.num_classes) == (kind, vocab, 1024, 1000)
  assert (cfg.num_layers, cfg.register, cfg.num_positions) == (24, 1, 1024)
  opt = load_config("imagenet").opt
  assert (opt.lr, opt.weight_decay, opt.warmup_steps, opt.ema_decay) == (1e-4, 0.03, 2500, 0.0)


# ---------------------------------------------------------------------------
# The PGM image model on a tiny grid.
# ---------------------------------------------------------------------------
G, C, NUM_CODES = 3, 4, 6
L = 1 + G * G
MASK, BOS = NUM_CODES, NUM_CODES + 1


@pytest.fixture(scope="module")
def pgm():
  cfg = ModelConfig("pgm_image", NUM_CODES + 2, MASK, hidden=32, num_heads=2, cond_dim=32,
                    enc_layers=1, dec_layers=1, dropout=0.0, dtype="float32", num_classes=C,
                    register=2)
  model = ImagePartitionDiT(cfg)
  tokens = jnp.zeros((1, L), jnp.int32)
  return model, random_params(model, tokens, tokens, jnp.zeros((1,), jnp.int32))


_APPLY = {}


def _apply(model):
  """One jitted apply per model, shared by the tests (they use few distinct shapes)."""
  if id(model) not in _APPLY:
    _APPLY[id(model)] = (model, jax.jit(model.apply, static_argnames=("method", "sorted_layout")))
  return _APPLY[id(model)][1]


def _batch(seed=0, batch=2):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, NUM_CODES, (batch, L)).astype(np.int32)
  tokens[:, 0] = BOS
  group = (rng.random((batch, L)) < 0.5).astype(np.int32)
  group[:, 0] = 0
  return jnp.asarray(tokens), jnp.asarray(group), jnp.asarray([1, 3][:batch], jnp.int32)


@pytest.mark.slow
def test_group1_predictions_ignore_group1_tokens_and_follow_the_class(pgm):
  model, params = pgm
  apply = _apply(model)
  tokens, group, labels = _batch()
  logits = apply({"params": params}, tokens, group, labels)
  changed = jnp.where(group == 1, (tokens + 1) % NUM_CODES, tokens)
  logits2 = apply({"params": params}, changed, group, labels)
  g1 = np.asarray(group == 1)
  np.testing.assert_allclose(np.asarray(logits)[g1], np.asarray(logits2)[g1], rtol=1e-5,
                             atol=1e-5)
  assert not np.allclose(np.asarray(logits)[~g1], np.asarray(logits2)[~g1], atol=1e-3)
  other_class = apply({"params": params}, tokens, group, (labels + 1) % C)
  assert not np.allclose(np.asarray(logits), np.asarray(other_class), atol=1e-3)


@pytest.mark.slow
def test_packed_inference_equals_the_training_layout(pgm):
  """Group-1 logits of the training layout (both registers) == `infer` on the packed
  group-0 tokens with only the group-0 register, queries at the group-1 positions."""
  model, params = pgm
  apply = _apply(model)
  tokens, group, labels = _batch(seed=1)
  full = np.asarray(apply({"params": params}, tokens, group, labels))
  # Packed rows padded to L keys (padding behind the valid length must be ignored) and L
  # queries (the extra ones are dropped): one program for both rows.
  tok, pos, query = (np.zeros(tokens.shape, np.int32) for _ in range(3))
  known_len, unknown = [], []
  for b in range(tokens.shape[0]):
    known = np.flatnonzero(np.asarray(group[b]) == 0)
    unknown.append(np.flatnonzero(np.asarray(group[b]) == 1))
    tok[b, :len(known)], pos[b, :len(known)] = np.asarray(tokens[b])[known], known
    query[b, :len(unknown[b])] = unknown[b]
    known_len.append(len(known))
  mask = AttentionMask.packed(jnp.asarray(known_len), L)
  packed = np.asarray(apply({"params": params}, jnp.asarray(tok), jnp.asarray(pos), mask,
                            jnp.asarray(query), labels, method="infer"))
  for b, positions in enumerate(unknown):
    np.testing.assert_allclose(packed[b, :len(positions)], full[b, positions], rtol=2e-5,
                               atol=2e-5)


@pytest.mark.slow
def test_sorted_layout_and_pallas_kernels_are_the_same_function(pgm):
  """The training layout with impl=xla (reference), the group-sorted layout (registers
  sorted with the tokens), and the Pallas kernels (interpreted on CPU) on the sorted layout
  and on the packed inference with registers: same logits."""
  model, params = pgm
  tokens, group, labels = _batch(seed=2)
  pallas = ImagePartitionDiT(dataclasses.replace(model.config, attn_impl="pallas", block_q=8,
                                                 block_kv=8, sorted_layout=True))
  known = np.asarray(group[0]) == 0
  k_tok = jnp.asarray(np.where(known, np.asarray(tokens[0]), 0)[None])  # unpacked: fine too
  k_pos = jnp.arange(L)[None]
  mask = AttentionMask(kind="full", kv_valid=jnp.asarray(known[None]))
  queries = jnp.asarray(np.flatnonzero(~known)[None])

  @jax.jit
  def run(params):
    v = {"params": params}
    return (model.apply(v, tokens, group, labels, sorted_layout=False),
            model.apply(v, tokens, group, labels, sorted_layout=True),
            pallas.apply(v, tokens, group, labels),
            model.apply(v, k_tok, k_pos, mask, queries, labels[:1], method="infer"),
            pallas.apply(v, k_tok, k_pos, mask, queries, labels[:1], method="infer"))

  plain, srt, kernel, infer_xla, infer_kernel = (np.asarray(x) for x in run(params))
  np.testing.assert_allclose(srt, plain, rtol=2e-5, atol=2e-5)
  np.testing.assert_allclose(kernel, plain, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(infer_kernel, infer_xla, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(infer_xla[0], plain[0, ~known], rtol=2e-5, atol=2e-5)


# ---------------------------------------------------------------------------
# Objectives.
# ---------------------------------------------------------------------------

def test_arccos_groups_and_label_dropout():
  u = jax.random.uniform(jax.random.key(0), (4, 20001))
  r = jnp.asarray([0.0, 0.3, 0.8, 1.0])
  group = np.asarray(objectives.image_groups(u, r))
  assert (group[:, 0] == 0).all()  # BOS
  expected = np.arccos(np.asarray(r)) / (np.pi / 2)
  np.testing.assert_allclose(group[:, 1:].mean(1), expected, atol=0.015)
  assert group[0, 1:].all() and not group[3].any()
  labels = jnp.arange(10000) % 7
  dropped = np.asarray(objectives.drop_labels(labels, jax.random.uniform(jax.random.key(1),
                                                                         (10000,)), 0.1, 7))
  share = (dropped == 7).mean()
  assert 0.09 < share < 0.11
  kept = dropped != 7
  np.testing.assert_array_equal(dropped[kept], np.asarray(labels)[kept])


@pytest.mark.parametrize("kind", ["pgm_image", "maskgit"])
@pytest.mark.slow
def test_image_loss_is_the_plain_cross_entropy(kind, pgm):
  """PGM: mean CE over every code of both groups; MaskGIT: over the masked codes; both with
  logit[MASK] = -1e6, from the model's logits."""
  if kind == "pgm_image":
    model, params = pgm
  else:
    cfg = ModelConfig("maskgit", NUM_CODES + 1, MASK, hidden=32, num_heads=2, cond_dim=32,
                      num_layers=1, dropout=0.0, dtype="float32", num_classes=C, register=1,
                      num_positions=G * G)
    model = MaskGIT(cfg)
    params = random_params(model, jnp.zeros((1, G * G), jnp.int32), jnp.zeros((1,), jnp.int32))
  tokens, _, labels = _batch(seed=3)
  batch = {"tokens": tokens, "labels": labels}
  r = jnp.asarray([0.2, 0.7])
  u = jax.random.uniform(jax.random.key(5), tokens.shape)
  terms = jax.jit(lambda p, b, r, u: steps.loss_terms(
      p, b, r, u, None, model=model, mask_id=MASK, train=False,
      sampling_eps=1e-3))(params, batch, r, u)
  counted = np.asarray(u < objectives.arccos_rate(r)[:, None])[:, 1:]
  if kind == "pgm_image":
    group = objectives.image_groups(u, r)
    logits = _apply(model)({"params": params}, tokens, group, labels)[:, 1:]
    counted = np.ones_like(counted)
  else:
    x = jnp.where(counted, MASK, tokens[:, 1:])
    logits = _apply(model)({"params": params}, x, labels)
  logits = np.asarray(logits, np.float64)
  logits[..., MASK] = -1e6
  logp = scipy.special.log_softmax(logits, axis=-1)
  nll = -np.take_along_axis(logp, np.asarray(tokens[:, 1:])[..., None], -1)[..., 0]
  assert float(terms.num_tokens) == counted.sum() > 0
  np.testing.assert_allclose(float(terms.loss_sum), nll[counted].sum(), rtol=1e-5)
  np.testing.assert_allclose(float(terms.nll_sum), float(terms.loss_sum))


def test_cosine_tail_schedule_is_the_references():
  opt = load_config("digits").opt
  opt.lr, opt.warmup_steps = 1e-4, 10
  sched = steps.learning_rate_schedule(opt, num_steps=1000)

  def reference(i, lr=1e-4, warm=10, max_iter=1000):  # trainer.abstract_trainer
    if i < warm:
      return lr * i / warm
    if i > max_iter - 0.1 * max_iter:
      decay = (i - (max_iter - 0.1 * max_iter)) / (0.1 * max_iter)
      return max(lr * 0.5 * (1 + np.cos(np.pi * decay)), lr * 0.01)
    return lr

  for i in (0, 5, 10, 500, 900, 901, 950, 999, 1000, 1200):
    assert float(sched(i)) == pytest.approx(reference(i), rel=1e-5, abs=1e-12), i
