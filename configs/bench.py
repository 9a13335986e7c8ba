r"""Sampling throughput benchmark: PGM (efficient-uniform) vs MDLM (ddpm_cache).

  python -m pgm_jax.main --config=configs/bench.py:cpu --workdir=workdirs/bench --mode=bench
  python -m pgm_jax.main --config=configs/bench.py:paper --workdir=workdirs/bench_paper \
      --mode=bench                       # on a GPU/TPU; on a CPU add flops_only:
  python -m pgm_jax.main --config=configs/bench.py:paper,flops_only \
      --workdir=workdirs/bench_paper --mode=bench

Presets:
  cpu         (default) the embedded default's models (MDLM 4 layers vs PGM 2+2, H=128;
              AR 4 layers and the block PGM 2+2 at b = 16 and b = 4), B=8, L=128, S=32,
              SentencePiece vocab 2049: a few minutes on 2 CPU cores.
  paper       L=1024, S=128, B=32, GPT-2 vocab: MDLM 12L/768 vs PGM 6+6/768, 8+8/768,
              6+6/1024 (method §5; analytic FLOP ratios 4.96x, 3.75x, 2.87x); AR 12L/768
              with its KV cache and the block PGM 6+6/768 at b = 16 and b = 4.
  lm1b        the LM1B setting: L=128, S=128, B=32, BERT vocabulary (pass
              --config.data.tokenizer_path=/path/to/vocab.txt): MDLM 12L/768 vs PGM 6+6/768.
  flops_only  cost analysis only (nothing is executed).
  runlocal    shrinks any of them for a CPU smoke run (B=2, L=32, S=4, H=64, the first
              PGM only, 1 timed run).
Trained weights: --config.bench.pgm_workdir=workdirs/pgm --config.bench.mdlm_workdir=...

Training speed (the reference's latency_train): add --config.bench.what=train (or all),
e.g. at the paper setting on a GPU/TPU:
  python -m pgm_jax.main --config=configs/bench.py:paper --workdir=workdirs/bench_train \
      --mode=bench --config.bench.what=train
"""
from pgm_jax import tools
from pgm_jax.core import config_lib


def get_config(arg=None):
  preset = config_lib.parse_arg(arg, cpu=False, paper=False, lm1b=False, flops_only=False,
                                runlocal=False)
  if preset.paper + preset.lm1b + preset.cpu > 1:
    raise ValueError("config presets 'cpu', 'paper' and 'lm1b' are mutually exclusive")
  c = tools.with_tool_configs(config_lib.base_config())
  if preset.lm1b:
    c.data.tokenizer = "bert_wordpiece"
    c.data.tokenizer_path = config_lib.placeholder(str)
    c.data.seq_len = 128
    c.model.dtype = "bfloat16"
    c.model.cond_dim = 128
    c.bench.setting = "lm1b"
    c.bench.batch_size = 32            # the reference's loader.eval_batch_size
    c.bench.seq_len = 128
    c.bench.steps = 127                # S <= L - 1 (the reference runs 128 on 128 tokens)
    c.bench.repeats = 10
    c.bench.warmup = 2
    c.bench.mdlm = dict(hidden=768, num_heads=12, num_layers=12)
    c.bench.pgm = (dict(name="pgm_6_6", hidden=768, num_heads=12, enc_layers=6,
                        dec_layers=6),)
    c.bench.ar = {}                    # the LM1B comparison is PGM vs MDLM only
    c.bench.pgm_block = ()
  elif preset.paper:
    c.data.tokenizer = "gpt2"
    c.data.tokenizer_path = "third_party/gpt2/gpt2.tiktoken"
    c.data.seq_len = 1024
    c.model.dtype = "bfloat16"
    c.model.cond_dim = 128
    c.bench.setting = "paper"
    c.bench.batch_size = 32
    c.bench.seq_len = 1024
    c.bench.steps = 128
    c.bench.repeats = 10               # the reference: 12 runs, first 2 dropped
    c.bench.warmup = 2
    c.bench.mdlm = dict(hidden=768, num_heads=12, num_layers=12)
    c.bench.ar = dict(hidden=768, num_heads=12, num_layers=12)
    c.bench.pgm_block = (
        dict(name="pgm_block_6_6_b16", hidden=768, num_heads=12, enc_layers=6, dec_layers=6,
             block_len=16),
        dict(name="pgm_block_6_6_b4", hidden=768, num_heads=12, enc_layers=6, dec_layers=6,
             block_len=4))
    c.bench.pgm = (
        dict(name="pgm_6_6", hidden=768, num_heads=12, enc_layers=6, dec_layers=6),
        dict(name="pgm_8_8", hidden=768, num_heads=12, enc_layers=8, dec_layers=8),
        dict(name="pgm_6_6_dim1024", hidden=1024, num_heads=16, enc_layers=6, dec_layers=6),
    )
  else:
    c.data.seq_len = 128
    c.model.dtype = "float32"
    c.model.cond_dim = 64
    c.bench.setting = "cpu"
    c.bench.batch_size = 8
    c.bench.seq_len = 128
    c.bench.steps = 32
    c.bench.repeats = 3
    c.bench.warmup = 1
    c.bench.mdlm = dict(hidden=128, num_heads=2, num_layers=4, cond_dim=64)
    c.bench.pgm = (dict(name="pgm_2_2", hidden=128, num_heads=2, enc_layers=2, dec_layers=2,
                        cond_dim=64),)
    c.bench.ar = dict(hidden=128, num_heads=2, num_layers=4, cond_dim=64)
    c.bench.pgm_block = (
        dict(name="pgm_block_2_2_b16", hidden=128, num_heads=2, enc_layers=2, dec_layers=2,
             cond_dim=64, block_len=16),
        dict(name="pgm_block_2_2_b4", hidden=128, num_heads=2, enc_layers=2, dec_layers=2,
             cond_dim=64, block_len=4))
  c.bench.flops_only = preset.flops_only
  if preset.runlocal:
    c.data.seq_len = 32
    c.model.dtype = "float32"
    c.model.cond_dim = 32
    c.bench.update(dict(batch_size=2, seq_len=32, steps=4, repeats=1, warmup=1))
    c.bench.mdlm = dict(hidden=64, num_heads=2, num_layers=2, cond_dim=32)
    first = dict(c.bench.pgm[0])["name"]           # one PGM (the others only differ in size)
    c.bench.pgm = (dict(name=first, hidden=64, num_heads=2, enc_layers=1, dec_layers=1,
                        cond_dim=32),)
    c.bench.ar = dict(hidden=64, num_heads=2, num_layers=2, cond_dim=32)
    c.bench.pgm_block = (dict(name="pgm_block_1_1_b8", hidden=64, num_heads=2, enc_layers=1,
                              dec_layers=1, cond_dim=32, block_len=8),)
  return c
