"""`python -m pgm_jax.tools.eval_assets COMMAND`: offline assets for evaluation.

  convert_gpt2        Hugging Face GPT-2 weights -> a gen-PPL judge (config.eval.judge_workdir)
  convert_inception   pytorch-fid's pt_inception-2015-12-05-6726825d.pth -> a torch-free .npz
  fid_stats           FID reference statistics (mu, sigma) of an image folder -> .npz
"""
import argparse


def main(argv=None):
  from pgm_jax.core import cli  # pylint: disable=g-import-not-at-top
  parser = cli.ArgumentParser(
      prog="python -m pgm_jax.tools.eval_assets", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--verbose", action="store_true", help="print tracebacks of errors")
  sub = parser.add_subparsers(dest="command", required=True)
  conv = sub.add_parser("convert_gpt2", help="GPT-2 judge. A pytorch_model.bin is a pickle and is "
                        "loaded with torch.load(weights_only=True); prefer model.safetensors.")
  conv.add_argument("--from", dest="src", required=True,
                    help="HF folder, model.safetensors or pytorch_model.bin, or a Hub repo "
                    "hf:[OWNER/]REPO[@REVISION] (e.g. hf:openai-community/gpt2-large; "
                    "config.json and the weights are downloaded; needs pgm_jax[hub])")
  conv.add_argument("--to", dest="out", required=True, help="output folder (the judge dir)")
  conv.add_argument("--n_head", type=int, default=None)
  inc = sub.add_parser("convert_inception", help="FID Inception weights (.pth, needs torch) -> .npz")
  inc.add_argument("--from", dest="src", required=True,
                   help="pt_inception-2015-12-05-6726825d.pth (pytorch-fid / torch-fidelity)")
  inc.add_argument("--to", dest="out", required=True, help="output .npz")
  stats = sub.add_parser("fid_stats", help="reference statistics of a folder of images")
  stats.add_argument("--images", required=True, help="folder of images (searched recursively)")
  stats.add_argument("--weights", required=True, help="FID Inception weights (.npz or .pth)")
  stats.add_argument("--to", dest="out", required=True, help="output .npz (mu, sigma)")
  stats.add_argument("--image_size", type=int, default=256,
                     help="resize shorter side + center crop to this (0: keep the files' size)")
  stats.add_argument("--batch_size", type=int, default=200)
  stats.add_argument("--limit", type=int, default=None, help="at most this many images")
  args = parser.parse_args(argv)
  cli.guarded("pgm_jax.tools.eval_assets", _run, args, verbose=args.verbose)


def _run(args) -> None:
  if args.command == "convert_gpt2":
    from pgm_jax.evaluation.judges import convert_gpt2  # pylint: disable=g-import-not-at-top
    meta = convert_gpt2(args.src, args.out, args.n_head)
    print(f"GPT-2 judge written to {args.out}: {meta['config']}")
  elif args.command == "convert_inception":
    from pgm_jax.models import inception  # pylint: disable=g-import-not-at-top
    if not args.out.endswith(".npz"):
      raise ValueError(f"--to={args.out}: must end in .npz")
    params = inception.load_params(args.src)
    inception.save_npz(params, args.out)
    print(f"FID Inception weights written to {args.out}")
  else:
    from pgm_jax.evaluation import fid  # pylint: disable=g-import-not-at-top
    result = fid.ref_stats_from_folder(args.images, args.weights,
                                       image_size=args.image_size or None,
                                       batch_size=args.batch_size, limit=args.limit)
    fid.save_ref_stats(args.out, result, source=f"{args.images} (image_size={args.image_size})")
    print(f"reference statistics of {result['num_images']} images written to {args.out}")


if __name__ == "__main__":
  main()
