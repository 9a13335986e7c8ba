"""What checkpoint checksums cost (docs/reliability.md): save one tree of N float32
parameters with the repo's Orbax manager, then time `checkpointing.write_checksums` and
`verify_checksums` on it. A train state holds four such trees (parameters, EMA, the two
Adam moments), so a save of it costs about four times what this prints.

    python scripts/checksum_cost.py [--params=170000000] [--dir=/tmp/pgm_jax_checksum_cost]
"""
import argparse
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from pgm_jax.core import checkpointing  # noqa: E402


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--params", type=int, default=170_000_000)
  p.add_argument("--dir", default="/tmp/pgm_jax_checksum_cost")
  args = p.parse_args()
  shutil.rmtree(args.dir, ignore_errors=True)
  manager = checkpointing.make_manager(args.dir)
  tree = {"params": jax.random.normal(jax.random.key(0), (args.params,), jnp.float32)}
  started = time.perf_counter()
  manager.save(1, args=checkpointing.ocp.args.Composite(
      state=checkpointing.ocp.args.StandardSave(tree)), force=True)
  manager.wait_until_finished()
  save_s = time.perf_counter() - started
  size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(f"{args.dir}/1")
             for f in fs)
  started = time.perf_counter()
  checkpointing.write_checksums(manager)
  write_s = time.perf_counter() - started
  started = time.perf_counter()
  checkpointing.verify_checksums(f"{args.dir}/1")
  verify_s = time.perf_counter() - started
  manager.close()
  shutil.rmtree(args.dir)
  mib = size / 2 ** 20
  print(f"{args.params:,} float32 parameters: Orbax wrote {mib:.0f} MiB in {save_s:.2f} s; "
        f"checksums {write_s:.2f} s ({mib / write_s:.0f} MiB/s), verify {verify_s:.2f} s")


if __name__ == "__main__":
  main()
