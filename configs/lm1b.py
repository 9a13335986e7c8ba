r"""LM1B (method §6): bert-base-uncased WordPiece, L = 128 (no packing), batch 512.

Data: TFDS `lm1b` prepared as ArrayRecord under --config.data.data_dir (read through
`tfds.data_source`, no TensorFlow); tokenizer: bert-base-uncased `vocab.txt` that you
supply (never downloaded):

  python -m pgm_jax.main --config=configs/lm1b.py:pgm --workdir=/tmp/lm1b_pgm \
      --config.data.data_dir=~/tensorflow_datasets \
      --config.data.tokenizer_path=/path/to/bert-base-uncased/vocab.txt

Presets: mdlm, mdlm_complement (the complement-MDLM ablation: an MDLM trained on x_t and
its complement), pgm (learn+freqs, default), pgm_mean, pgm_logsumexp (GroupSwap query
ablations), wrap (the reference's `lm1b-wrap`: packed blocks, no padding; needs the
one-time preprocessing below), runlocal. The mdlm and pgm presets fit a v5e-32 and a
v4-32 (docs/scaling.md).

As the reference scores LM1B: sentences are cleaned by its LM1B detokenizer, tokenized as
[CLS] + at most 126 tokens + [SEP] (truncation keeps the final [SEP], as the HF tokenizer
does), padded to 128, and the pads are fed to the model (they get groups and noise) and
masked only in the loss (config.data.attend_to_padding=True).

`wrap` reads packed blocks made once by
  python -m pgm_jax.tools.preprocess --source=tfds:lm1b/train --val_source=tfds:lm1b/test \
      --data_dir=~/tensorflow_datasets --tokenizer=bert_wordpiece \
      --tokenizer_path=/path/to/vocab.txt --detokenizer=lm1b --group_docs=1000 \
      --seq_len=128 --out=/data/lm1b_wrap_128
"""
from pgm_jax import tools
from pgm_jax.core import config_lib

_QUERY = {"pgm": "learn+freqs", "pgm_mean": "learn+freqs+mean",
          "pgm_logsumexp": "learn+freqs+logsumexp"}


def get_config(arg=None):
  preset = config_lib.parse_arg(arg, mdlm=False, mdlm_complement=False, pgm=False,
                                pgm_mean=False, pgm_logsumexp=False, wrap=False,
                                runlocal=False)
  chosen = [k for k in ("mdlm", "mdlm_complement", *_QUERY) if preset[k]] or ["pgm"]
  if len(chosen) > 1:
    raise ValueError(f"config presets {chosen} are mutually exclusive")
  c = tools.with_tool_configs(config_lib.base_config())
  if chosen[0] in ("mdlm", "mdlm_complement"):
    c.model.kind = "mdlm"
    if chosen[0] == "mdlm_complement":
      c.train.objective = "complement-mdlm"
  else:
    c.model.kind = "pgm"
    c.model.query_mode = _QUERY[chosen[0]]
  c.model.hidden = 768
  c.model.num_heads = 12
  c.model.num_layers = 12
  c.model.enc_layers = 6
  c.model.dec_layers = 6

  c.data.name = "lm1b"
  c.data.tokenizer = "bert_wordpiece"
  c.data.tokenizer_path = config_lib.placeholder(str)
  c.data.seq_len = 128
  c.data.detokenizer = "lm1b"
  c.data.attend_to_padding = True   # the reference feeds pads and masks them in the loss only
  if preset.wrap:                   # `data=lm1b-wrap`: packed [CLS] ... [SEP] blocks
    c.data.name = "array_record"
    c.data.attend_to_padding = False  # nothing to pad

  c.train.batch_size = 512          # 8 GPUs x 64 in the paper
  c.train.num_steps = 1_000_000
  c.eval.batch_size = 512
  c.sample.steps = 127

  if preset.runlocal:
    config_lib.apply_runlocal(c)
  return c
