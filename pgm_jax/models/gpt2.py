"""GPT-2 in Flax, for generative-perplexity judging with user-supplied weights.

Parameter names follow the Hugging Face state dict (`transformer.` prefix dropped,
dots inside a block joined by "_"): wte [V, E], wpe [P, E], h_{i}_{ln_1, attn_c_attn,
attn_c_proj, ln_2, mlp_c_fc, mlp_c_proj}, ln_f. HF's Conv1D stores weights as [in, out], the same layout as a
  Flax kernel, so they copy over without a transpose. The LM head is tied to wte.
"""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from pgm_jax.ops import AttentionMask, partition_attention


@dataclasses.dataclass(frozen=True)
class GPT2Config:
  vocab_size: int = 50257
  n_positions: int = 1024
  n_embd: int = 768
  n_layer: int = 12
  n_head: int = 12
  layer_norm_epsilon: float = 1e-5


class _Dense(nn.Module):
  features: int

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.normal(0.02), (x.shape[-1], self.features))
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
    return x @ kernel + bias


class GPT2(nn.Module):
  config: GPT2Config

  @nn.compact
  def __call__(self, tokens_BxL, valid_BxL=None):
    cfg = self.config
    batch, length = tokens_BxL.shape
    if length > cfg.n_positions:
      raise ValueError(f"GPT-2 takes at most {cfg.n_positions} tokens, got {length}")
    wte = self.param("wte", nn.initializers.normal(0.02), (cfg.vocab_size, cfg.n_embd))
    wpe = self.param("wpe", nn.initializers.normal(0.01), (cfg.n_positions, cfg.n_embd))
    x = wte[tokens_BxL] + wpe[jnp.arange(length)][None]
    mask = AttentionMask(kind="causal", kv_valid=valid_BxL)
    ln = lambda name: nn.LayerNorm(epsilon=cfg.layer_norm_epsilon, name=name)
    head_dim = cfg.n_embd // cfg.n_head
    for i in range(cfg.n_layer):
      block = f"h_{i}"
      h = ln(f"{block}_ln_1")(x)
      qkv = _Dense(3 * cfg.n_embd, name=f"{block}_attn_c_attn")(h)
      q, k, v = (t.reshape(batch, length, cfg.n_head, head_dim) for t in jnp.split(qkv, 3, -1))
      att = partition_attention(q, k, v, mask).reshape(batch, length, cfg.n_embd)
      x = x + _Dense(cfg.n_embd, name=f"{block}_attn_c_proj")(att)
      h = ln(f"{block}_ln_2")(x)
      h = nn.gelu(_Dense(4 * cfg.n_embd, name=f"{block}_mlp_c_fc")(h), approximate=True)
      x = x + _Dense(cfg.n_embd, name=f"{block}_mlp_c_proj")(h)
    x = ln("ln_f")(x)
    return (x @ wte.T).astype(jnp.float32)


def hf_to_flax(state: dict, cfg: GPT2Config) -> dict:
  """HF GPT-2 state dict (numpy arrays) -> our parameter tree. Checks names and shapes."""
  state = {k[len("transformer."):] if k.startswith("transformer.") else k: v
           for k, v in state.items()}
  ignored = {k for k in state if k.endswith((".attn.bias", ".attn.masked_bias"))
             or k == "lm_head.weight"}
  e = cfg.n_embd
  expected = {"wte.weight": (cfg.vocab_size, e), "wpe.weight": (cfg.n_positions, e),
              "ln_f.weight": (e,), "ln_f.bias": (e,)}
  for i in range(cfg.n_layer):
    for name, shape in (("ln_1.weight", (e,)), ("ln_1.bias", (e,)),
                        ("attn.c_attn.weight", (e, 3 * e)), ("attn.c_attn.bias", (3 * e,)),
                        ("attn.c_proj.weight", (e, e)), ("attn.c_proj.bias", (e,)),
                        ("ln_2.weight", (e,)), ("ln_2.bias", (e,)),
                        ("mlp.c_fc.weight", (e, 4 * e)), ("mlp.c_fc.bias", (4 * e,)),
                        ("mlp.c_proj.weight", (4 * e, e)), ("mlp.c_proj.bias", (e,))):
      expected[f"h.{i}.{name}"] = shape
  missing = sorted(set(expected) - set(state))
  unexpected = sorted(set(state) - set(expected) - ignored)
  if missing or unexpected:
    raise ValueError(f"GPT-2 weights: missing keys {missing[:6]}, unexpected keys "
                     f"{unexpected[:6]}")
  for key, shape in expected.items():
    if tuple(state[key].shape) != shape:
      raise ValueError(f"GPT-2 weights: {key} has shape {tuple(state[key].shape)}, "
                       f"expected {shape}")
  params = {"wte": state["wte.weight"], "wpe": state["wpe.weight"],
            "ln_f": {"scale": state["ln_f.weight"], "bias": state["ln_f.bias"]}}
  for i in range(cfg.n_layer):
    p = lambda n: state[f"h.{i}.{n}"]
    params[f"h_{i}_ln_1"] = {"scale": p("ln_1.weight"), "bias": p("ln_1.bias")}
    params[f"h_{i}_ln_2"] = {"scale": p("ln_2.weight"), "bias": p("ln_2.bias")}
    for ours, theirs in (("attn_c_attn", "attn.c_attn"), ("attn_c_proj", "attn.c_proj"),
                         ("mlp_c_fc", "mlp.c_fc"), ("mlp_c_proj", "mlp.c_proj")):
      params[f"h_{i}_{ours}"] = {"kernel": p(f"{theirs}.weight"), "bias": p(f"{theirs}.bias")}
  return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)


def config_from_state(state: dict, n_head: int | None = None) -> GPT2Config:
  """Infers the architecture from the weights (n_head from HF config or the GPT-2 sizes)."""
  state = {k[len("transformer."):] if k.startswith("transformer.") else k: v
           for k, v in state.items()}
  vocab, embd = state["wte.weight"].shape
  layers = len({k.split(".")[1] for k in state if k.startswith("h.")})
  heads = n_head or {768: 12, 1024: 16, 1280: 20, 1600: 25}.get(embd)
  if heads is None:
    raise ValueError(f"cannot infer n_head for n_embd={embd}: pass --n_head")
  return GPT2Config(vocab_size=vocab, n_positions=state["wpe.weight"].shape[0], n_embd=embd,
                    n_layer=layers, n_head=heads)
