"""`python -m pgm_jax.evaluation convert_gpt2 --from=HF_DIR --to=JUDGE_DIR`: Hugging Face
GPT-2 weights -> a gen-PPL judge for config.eval.judge_workdir."""
from pgm_jax.evaluation.judges import convert_gpt2


def main(argv=None):
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(
      prog="python -m pgm_jax.evaluation",
      description="Convert Hugging Face GPT-2 weights into a gen-PPL judge for "
                  "config.eval.judge_workdir. A pytorch_model.bin is a pickle and is loaded "
                  "with torch.load(weights_only=True); prefer model.safetensors.")
  sub = parser.add_subparsers(dest="command", required=True)
  conv = sub.add_parser("convert_gpt2")
  conv.add_argument("--from", dest="src", required=True,
                    help="HF folder, model.safetensors or pytorch_model.bin")
  conv.add_argument("--to", dest="out", required=True, help="output folder (the judge dir)")
  conv.add_argument("--n_head", type=int, default=None)
  args = parser.parse_args(argv)
  try:
    meta = convert_gpt2(args.src, args.out, args.n_head)
  except ValueError as e:
    raise SystemExit(f"pgm_jax.evaluation: error: {e}")
  print(f"GPT-2 judge written to {args.out}: {meta['config']}")


if __name__ == "__main__":
  main()
