"""`python -m pgm_jax.tools.vq --from=vq_ds8_c2i.pt --to=vq_ds8_c2i.npz`: LlamaGen's VQ-8
tokenizer weights (a PyTorch pickle) -> a torch-free .npz that `pgm_jax.models.vq.load_vq`
reads (config.data.tokenizer_path of the ImageNet configs; docs/images.md).
`--from=hf:FoundationVision/LlamaGen/vq_ds8_c2i.pt` downloads it first (pgm_jax.io.hub)."""
from __future__ import annotations

import dataclasses
import os

from pgm_jax.core import cli, fileio
from pgm_jax.io import hub
from pgm_jax.models import vq


def main(argv=None):
  p = cli.ArgumentParser(prog="python -m pgm_jax.tools.vq",
                         description="Convert LlamaGen's vq_ds8_c2i.pt to a torch-free .npz.")
  p.add_argument("--from", dest="src", required=True, help="vq_ds8_c2i.pt (LlamaGen release), or "
                 "hf:FoundationVision/LlamaGen/vq_ds8_c2i.pt (needs pgm_jax[hub])")
  p.add_argument("--to", dest="out", required=True, help="output .npz")
  p.add_argument("--unsafe_pickle", action="store_true",
                 help="fully unpickle the file (runs code from it; only for files you trust)")
  p.add_argument("--verbose", action="store_true", help="print tracebacks of errors")
  args = p.parse_args(argv)
  if not args.out.endswith(".npz"):
    p.error(f"--to={args.out}: must end in .npz")
  cli.guarded("pgm_jax.tools.vq", _run, args, verbose=args.verbose)


def _run(args) -> None:
  """Bad input is one line naming the flag (exit 1), as every pgm_jax command."""
  src = hub.resolve(args.src, "--from", print)  # hf:OWNER/REPO/FILE[@REV] -> the cached file
  try:
    params, cfg = vq.load_params(src, unsafe_pickle=args.unsafe_pickle)
  except ValueError as e:
    raise ValueError(f"--from: {e}") from None
  fileio.check_writable_dir(os.path.dirname(os.path.abspath(args.out)), "--to", create=False)
  vq.save_npz(params, args.out, cfg)  # tmp file + rename
  print(f"wrote {args.out}: {vq.num_params(params):,} parameters, {dataclasses.asdict(cfg)}")


if __name__ == "__main__":
  main()
