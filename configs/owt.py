r"""OpenWebText at paper scale (method §6): L = 1024, global batch 512, 1M steps.

Data: run the one-time preprocessing (GPT-2 tokenizer, EOS per document, 1022-token
chunks wrapped as [BOS] + chunk + [EOS], last 100k documents = validation):

  python -m pgm_jax.tools.preprocess --source=jsonl:/data/owt/*.jsonl --tokenizer=gpt2 \
      --seq_len=1024 --val_last_docs=100000 --out=/data/owt_gpt2_1024

then train, e.g. on a pod (see launch/):

  python -m pgm_jax.main --config=configs/owt.py:pgm_6_6 --workdir=gs://bucket/pgm_6_6 \
      --config.data.data_dir=/data/owt_gpt2_1024

Presets: mdlm (12 layers, 768), mdlm_complement (the same MDLM trained with the
complement-MDLM objective, two views per sequence: 2 accumulation steps, as the reference's
16 GPUs x 16), pgm_6_6 (default), pgm_8_8, pgm_6_6_dim1024 (1024/16), pgm_block_6_6 (the block PGM,
docs/method.md §9: 6+6/768, blocks of 16 tokens; remat, its encoder runs on 2L), runlocal
(shrinks everything for a CPU smoke run; still needs data_dir).

SDTT distillation of a trained model (method §8, pgm_jax/distill.py): presets
distill_pgm_8_8, distill_pgm_6_6_dim1024 and distill_mdlm, with the teacher's workdir
(or a checkpoint converted by pgm_jax.tools.convert):

  python -m pgm_jax.main --config=configs/owt.py:distill_pgm_8_8 \
      --workdir=gs://bucket/distill_pgm_8_8 --config.data.data_dir=/data/owt_gpt2_1024 \
      --config.distill.teacher_workdir=gs://bucket/pgm_8_8

Batch 128, lr 3e-4 constant after 2500 warmup steps, AdamW without weight decay, EMA
0.9999, no dropout, 50k steps; dt starts at (1 - 1e-5) / 1024 and doubles every 10k
steps (5 rounds: the last student samples in 32 steps). Then evaluate the student as
any model, with the same config:

  python -m pgm_jax.main --config=configs/owt.py:distill_pgm_8_8 --workdir=... --mode=eval \
      --config.eval.gen_ppl=True --config.eval.judge_workdir=... --config.sample.steps=32

The mdlm and pgm presets fit a v5e-32 and a v4-32 with these defaults (TPU compiler,
docs/scaling.md; mdlm_complement and the distill presets were not planned):

  python -m pgm_jax.main --config=configs/owt.py:pgm_8_8 --workdir=/tmp/plan --mode=plan \
      --config.plan.topology=v5e-32
"""
from pgm_jax import tools
from pgm_jax.core import config_lib

_MODELS = {
    "mdlm": dict(kind="mdlm", hidden=768, num_heads=12, num_layers=12),
    "mdlm_complement": dict(kind="mdlm", hidden=768, num_heads=12, num_layers=12),
    "pgm_6_6": dict(kind="pgm", hidden=768, num_heads=12, enc_layers=6, dec_layers=6),
    "pgm_8_8": dict(kind="pgm", hidden=768, num_heads=12, enc_layers=8, dec_layers=8),
    "pgm_6_6_dim1024": dict(kind="pgm", hidden=1024, num_heads=16, enc_layers=6,
                            dec_layers=6),
    # Not in the paper: the block PGM (docs/method.md §9), the PGM 6+6 in blocks of 16.
    "pgm_block_6_6": dict(kind="pgm_block", hidden=768, num_heads=12, enc_layers=6,
                          dec_layers=6, block_len=16),
}

# The paper's distillation runs (method §8): preset -> the model it distils.
_DISTILL = {"distill_pgm_8_8": "pgm_8_8", "distill_pgm_6_6_dim1024": "pgm_6_6_dim1024",
            "distill_mdlm": "mdlm"}


def _distill(c):
  """SDTT (method §8): the reference's hyperparameters."""
  c.distill.enabled = True
  c.distill.initial_steps = 1024    # dt = (1 - 1e-5) / 1024 in round 1
  c.distill.round_steps = 10_000    # dt doubles, student -> teacher
  c.distill.teacher_steps = 2
  c.distill.loss = "kl-bwd"
  c.distill.sampling_eps = 1e-5
  c.train.num_steps = 50_000        # 5 rounds: students for 512, ..., 32 steps
  c.train.batch_size = 128
  c.train.eval_every = 5000         # the reference's val_check_interval
  c.model.dropout = 0.0
  c.opt.lr = 3e-4
  c.opt.warmup_steps = 2500
  c.opt.weight_decay = 0.0
  c.opt.ema_decay = 0.9999
  c.ckpt.every_steps = 10_000       # the student at the end of every round is kept
  c.ckpt.keep_every = 10_000


def get_config(arg=None):
  preset = config_lib.parse_arg(arg, runlocal=False, **{k: False for k in _MODELS},
                                **{k: False for k in _DISTILL})
  names = [k for k in list(_MODELS) + list(_DISTILL) if preset[k]]
  if len(names) > 1:
    raise ValueError(f"config presets {names} are mutually exclusive")
  chosen = [_DISTILL.get(k, k) for k in names] or ["pgm_6_6"]
  c = tools.with_tool_configs(config_lib.base_config())
  for k, v in _MODELS[chosen[0]].items():
    c.model[k] = v
  c.model.cond_dim = 128
  c.model.dropout = 0.1
  c.model.dtype = "bfloat16"

  # Memory levers (docs/scaling.md has the TPU compiler's plan for every preset):
  # (The group-sorted PGM layout follows the attention: config.attn.sorted_layout="auto".)
  c.model.loss_chunk_len = 128      # never materialise float32 [B, L, V] logits
  # No rematerialisation where the plan shows it fits without (mdlm, pgm_6_6); the wider
  # or deeper PGMs save only the weight matmuls' outputs and recompute the rest.
  c.model.remat = ("none" if chosen[0] in ("mdlm", "mdlm_complement", "pgm_6_6")
                   else "dots_with_no_batch_dims_saveable")
  if chosen[0] == "mdlm_complement":
    c.train.objective = "complement-mdlm"
    c.train.grad_accum_steps = 2      # each sequence is fed twice (x_t and its complement)

  c.data.name = "array_record"
  c.data.tokenizer = "gpt2"
  c.data.tokenizer_path = "third_party/gpt2/gpt2.tiktoken"
  c.data.seq_len = 1024

  c.train.batch_size = 512          # 16 GPUs x 32 in the paper
  c.train.num_steps = 1_000_000
  c.train.log_every = 100
  c.train.eval_every = 20_000
  c.eval.batch_size = 512
  c.opt.lr = 3e-4
  c.opt.warmup_steps = 2500
  c.opt.ema_decay = 0.9999
  c.ckpt.every_steps = 5000
  c.ckpt.keep_every = 100_000
  c.sample.steps = 128

  if any(preset[k] for k in _DISTILL):
    _distill(c)
  if preset.runlocal:
    config_lib.apply_runlocal(c, seq_len=128)
    c.train.grad_accum_steps = 1
  return c
