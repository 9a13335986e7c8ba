"""Model tests: parameter counts, information flow between groups, packed inference,
and the attention op against a NumPy oracle."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pgm_jax.models import DiT, ModelConfig, PartitionDiT, QUERY_MODES
from pgm_jax.ops import AttentionMask, partition_attention

V_PAPER = 50258


def _count_params(model, kind):
  tokens = jnp.zeros((1, 8), jnp.int32)
  args = (tokens, tokens) if kind == "pgm" else (tokens,)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *args))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


@pytest.mark.parametrize("kind,hidden,heads,layers,expected_m", [
    ("mdlm", 768, 12, (12, 0), 169.6),
    ("pgm", 768, 12, (6, 6), 172.0),
    ("pgm", 768, 12, (8, 8), 202.7),
    ("pgm", 1024, 16, (6, 6), 268.1),
])
def test_paper_parameter_counts(kind, hidden, heads, layers, expected_m):
  cfg = ModelConfig(kind, V_PAPER, V_PAPER - 1, hidden=hidden, num_heads=heads,
                    num_layers=layers[0], enc_layers=layers[0], dec_layers=layers[1])
  model = PartitionDiT(cfg) if kind == "pgm" else DiT(cfg)
  assert round(_count_params(model, kind) / 1e6, 1) == expected_m


def test_reference_parameter_names_and_shapes():
  """A few state-dict entries of docs/convert.md, transposed for Flax."""
  h, c, v = 768, 128, V_PAPER
  cfg = ModelConfig("pgm", v, v - 1, hidden=h, num_heads=12, enc_layers=1, dec_layers=1)
  tokens = jnp.zeros((1, 8), jnp.int32)
  shapes = jax.eval_shape(lambda: PartitionDiT(cfg).init(jax.random.key(0), tokens, tokens))
  p = jax.tree.map(lambda x: x.shape, shapes["params"])
  p = jax.tree.map(lambda x: getattr(x, "value", x), p,
                   is_leaf=lambda x: hasattr(x, "value"))
  assert p["vocab_embed"]["embedding"] == (v, h)
  assert p["encoder"]["blocks_0"]["attn_qkv"]["kernel"] == (h, 3 * h)
  assert p["encoder"]["blocks_0"]["adaLN_modulation"]["kernel"] == (c, 6 * h)
  assert p["decoder"]["group_swap"]["base_embedding"] == (1, h)
  assert p["decoder"]["group_swap"]["hidden_to_key_value"]["bias"] == (2 * h,)
  assert p["decoder"]["layers_0"]["attn_kv"]["kernel"] == (h, 2 * h)
  assert set(p["decoder"]["layers_0"]) == {
      "adaLN_modulation", "q_norm1", "kv_norm1", "norm2", "attn_q", "attn_kv", "attn_out",
      "mlp"}
  assert p["output_layer"]["linear"]["kernel"] == (h, v)
  assert p["sigma_map"]["mlp_0"]["kernel"] == (256, c)


# ---------------------------------------------------------------------------
# Information flow: a position's prediction never depends on its own group.
# ---------------------------------------------------------------------------

L, VOCAB = 12, 40


def _tiny(kind="pgm", query_mode="learn+freqs", dropout=0.0):
  return ModelConfig(kind, VOCAB, VOCAB - 1, hidden=32, num_heads=2, cond_dim=16,
                     num_layers=2, enc_layers=2, dec_layers=2, query_mode=query_mode,
                     dropout=dropout, dtype="float32")


def _randomize(params, seed):
  """Random values everywhere (zero-init layers would hide every dependency)."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return treedef.unflatten([0.3 * jax.random.normal(k, x.shape, x.dtype)
                            for k, x in zip(keys, leaves)])


def _init(model, seed=0, batch=1):
  tokens = jnp.zeros((batch, L), jnp.int32)
  params = model.init(jax.random.key(seed), tokens, tokens)["params"]
  return _randomize(jax.tree.map(lambda x: getattr(x, "value", x), params,
                                 is_leaf=lambda x: hasattr(x, "value")), seed + 1)


def _embedding_jacobian_norms(model, params, tokens, group, train=False):
  """|d logits[i] / d embedding(tokens[j])| for all i, j (tokens are all distinct)."""
  proj = jax.random.normal(jax.random.key(7), (L, VOCAB))

  def outputs(table):
    p = dict(params, vocab_embed={"embedding": table})
    rngs = {"dropout": jax.random.key(3)} if train else {}
    logits = model.apply({"params": p}, tokens[None], group[None], train=train, rngs=rngs)[0]
    return jnp.sum(logits * proj, axis=-1)  # [L]: one scalar per output position

  jac_LxVxH = jax.jacrev(outputs)(params["vocab_embed"]["embedding"])
  return jnp.abs(jac_LxVxH[:, tokens, :]).sum(-1)  # [L, L]: output i, input position j


@pytest.mark.parametrize("query_mode,split", [
    *[(mode, "random") for mode in QUERY_MODES],
    *[("learn+freqs+mean", s) for s in ("all_group0", "all_group1", "single")],
])
@pytest.mark.slow
def test_no_information_flows_within_a_group(query_mode, split):
  model = PartitionDiT(_tiny(query_mode=query_mode))
  params = _init(model)
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.permutation(VOCAB - 1)[:L], jnp.int32)  # distinct ids
  group = {"random": rng.integers(0, 2, L), "all_group0": np.zeros(L),
           "all_group1": np.ones(L), "single": np.eye(1, L, 5)[0]}[split]
  group = jnp.asarray(group, jnp.int32)
  norms = np.asarray(_embedding_jacobian_norms(model, params, tokens, group))
  same = np.asarray(group)[:, None] == np.asarray(group)[None, :]
  assert np.all(norms[same] == 0.0), "an output depends on a token of its own group"
  # Every output must depend on every token of the other group.
  assert np.all(norms[~same] > 0.0)


@pytest.mark.slow
def test_no_information_flow_with_dropout():
  model = PartitionDiT(_tiny(dropout=0.3))
  params = _init(model)
  tokens = jnp.arange(L, dtype=jnp.int32)
  group = jnp.asarray(np.random.default_rng(1).integers(0, 2, L), jnp.int32)
  norms = np.asarray(_embedding_jacobian_norms(model, params, tokens, group, train=True))
  same = np.asarray(group)[:, None] == np.asarray(group)[None, :]
  assert np.all(norms[same] == 0.0)
  assert np.any(norms[~same] > 0.0)


def test_empty_group_outputs_are_finite():
  model = PartitionDiT(_tiny())
  params = _init(model)
  tokens = jnp.arange(L, dtype=jnp.int32)[None]
  for group in (jnp.zeros((1, L), jnp.int32), jnp.ones((1, L), jnp.int32)):
    logits = model.apply({"params": params}, tokens, group)
    assert np.all(np.isfinite(np.asarray(logits)))


def test_mdlm_dit_sees_everything():
  model = DiT(_tiny("mdlm"))
  tokens = jnp.zeros((1, L), jnp.int32)
  params = _randomize(jax.tree.map(
      lambda x: getattr(x, "value", x), model.init(jax.random.key(0), tokens)["params"],
      is_leaf=lambda x: hasattr(x, "value")), 1)
  toks = jnp.arange(L, dtype=jnp.int32)

  def out(table):
    p = dict(params, vocab_embed={"embedding": table})
    return model.apply({"params": p}, toks[None])[0].sum(-1)

  jac = jax.jacrev(out)(params["vocab_embed"]["embedding"])
  assert np.all(np.abs(np.asarray(jac[:, toks, :])).sum(-1) > 0)


# ---------------------------------------------------------------------------
# Packed inference == training layout (the basis of the efficient sampler).
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("query_mode", QUERY_MODES)
@pytest.mark.slow
def test_packed_inference_matches_training_layout(query_mode):
  model = PartitionDiT(_tiny(query_mode=query_mode))
  params = _init(model, batch=2)
  rng = np.random.default_rng(2)
  tokens = jnp.asarray(rng.integers(0, VOCAB - 1, (2, L)), jnp.int32)
  group = np.ones((2, L), np.int32)
  group[0, [0, 3, 4, 9]] = 0          # 4 clean tokens
  group[1, [0, 1, 2, 5, 6, 7, 11]] = 0  # 7 clean tokens
  full = model.apply({"params": params}, tokens, jnp.asarray(group))

  # Pack clean tokens left, pad to 8 with junk; query the masked positions (padded to 8).
  n_max, q_max = 8, 8
  clean_tok, clean_pos, lens, q_pos = [], [], [], []
  for b in range(2):
    pos = np.flatnonzero(group[b] == 0)
    qs = np.flatnonzero(group[b] == 1)
    clean_tok.append(np.pad(np.asarray(tokens[b])[pos], (0, n_max - len(pos)),
                            constant_values=5))
    clean_pos.append(np.pad(pos, (0, n_max - len(pos)), constant_values=3))
    lens.append(len(pos))
    q_pos.append(np.pad(qs, (0, q_max - len(qs)), constant_values=0))
  clean_tok, clean_pos = jnp.asarray(np.stack(clean_tok)), jnp.asarray(np.stack(clean_pos))
  q_pos, lens = jnp.asarray(np.stack(q_pos)), jnp.asarray(lens)
  mask = AttentionMask.packed(lens, n_max)
  enc = model.apply({"params": params}, clean_tok, clean_pos, mask, method="encode")
  logits = model.apply({"params": params}, enc, clean_pos, q_pos, mask, method="decode")
  for b in range(2):
    qs = np.flatnonzero(group[b] == 1)
    np.testing.assert_allclose(np.asarray(logits[b, :len(qs)]), np.asarray(full[b, qs]),
                               rtol=2e-5, atol=2e-5)


# ---------------------------------------------------------------------------
# The attention op against a NumPy oracle.
# ---------------------------------------------------------------------------

def _numpy_attention(q, k, v, allowed):
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  out = np.zeros(q.shape)
  for b in range(q.shape[0]):
    for i in range(q.shape[1]):
      keys = np.flatnonzero(allowed[b, i])
      if len(keys) == 0:
        continue  # empty row -> 0
      w = np.exp(s[b, :, i, keys] - s[b, :, i, keys].max(0))  # [K, H]
      w = w / w.sum(0)
      out[b, i] = np.einsum("kh,khd->hd", w, v[b, keys])
  return out


@pytest.mark.parametrize("kind", ["full", "same_group", "other_group", "causal"])
def test_attention_matches_numpy(kind):
  rng = np.random.default_rng(3)
  b, lq, h, d = 3, 10, 2, 8
  q, k, v = (jnp.asarray(rng.normal(size=(b, lq, h, d)), jnp.float32) for _ in range(3))
  g = rng.integers(0, 2, (b, lq))
  g[1] = 0  # example 1: everything in group 0 (other_group rows all empty)
  valid = np.ones((b, lq), bool)
  valid[2, 7:] = False
  mask = AttentionMask(kind, jnp.asarray(g), jnp.asarray(g), jnp.asarray(valid))
  if kind == "same_group":
    allowed = g[:, :, None] == g[:, None, :]
  elif kind == "other_group":
    allowed = g[:, :, None] != g[:, None, :]
  elif kind == "causal":
    allowed = np.broadcast_to(np.tril(np.ones((lq, lq), bool)), (b, lq, lq))
  else:
    allowed = np.ones((b, lq, lq), bool)
  allowed = allowed & valid[:, None, :]
  out = jax.jit(functools.partial(partition_attention, impl="xla"))(q, k, v, mask)
  np.testing.assert_allclose(np.asarray(out), _numpy_attention(q, k, v, allowed),
                             rtol=1e-5, atol=1e-5)
  if kind == "other_group":
    assert np.all(np.asarray(out[1]) == 0.0)


def test_empty_rows_have_zero_gradient():
  rng = np.random.default_rng(4)
  q, k, v = (jnp.asarray(rng.normal(size=(1, 6, 1, 4)), jnp.float32) for _ in range(3))
  g = jnp.zeros((1, 6), jnp.int32)
  mask = AttentionMask("other_group", g, g)
  grads = jax.grad(lambda q, k, v: partition_attention(q, k, v, mask).sum(),
                   argnums=(0, 1, 2))(q, k, v)
  for grad in grads:
    assert np.all(np.asarray(grad) == 0.0)


def test_attention_rejects_unknown_impl():
  x = jnp.zeros((1, 2, 1, 2))
  with pytest.raises(ValueError, match="config.attn.impl"):
    partition_attention(x, x, x, AttentionMask(), impl="cuda")
