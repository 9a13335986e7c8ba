"""`python -m pgm_jax.tools.vq --from=vq_ds8_c2i.pt --to=vq_ds8_c2i.npz`: LlamaGen's VQ-8
tokenizer weights (a PyTorch pickle) -> a torch-free .npz that `pgm_jax.models.vq.load_vq`
reads (config.data.tokenizer_path of the ImageNet configs; docs/images.md)."""
from __future__ import annotations

import dataclasses
import sys

from pgm_jax.models import vq


def main(argv=None):
  import argparse  # pylint: disable=g-import-not-at-top
  p = argparse.ArgumentParser(prog="python -m pgm_jax.tools.vq",
                              description="Convert LlamaGen's vq_ds8_c2i.pt to a torch-free .npz.")
  p.add_argument("--from", dest="src", required=True, help="vq_ds8_c2i.pt (LlamaGen release)")
  p.add_argument("--to", dest="out", required=True, help="output .npz")
  p.add_argument("--unsafe_pickle", action="store_true",
                 help="fully unpickle the file (runs code from it; only for files you trust)")
  args = p.parse_args(argv)
  if not args.out.endswith(".npz"):
    p.error(f"--to={args.out}: must end in .npz")
  try:
    params, cfg = vq.load_params(args.src, unsafe_pickle=args.unsafe_pickle)
  except ValueError as e:
    print(f"pgm_jax.tools.vq: error: --from={args.src}: {e}", file=sys.stderr)
    raise SystemExit(2)
  vq.save_npz(params, args.out, cfg)
  print(f"wrote {args.out}: {vq.num_params(params):,} parameters, {dataclasses.asdict(cfg)}")


if __name__ == "__main__":
  main()
