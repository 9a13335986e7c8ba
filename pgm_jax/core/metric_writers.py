"""Metric writers: TensorBoard event files (tensorboardX, no TensorFlow), a JSONL log
and absl logging. `clu.metric_writers` would pull in TensorFlow (+1.5 GB); this keeps
the same small interface (`write_scalars`, `write_texts`, `write_hparams`).
"""
from __future__ import annotations

import json
import os
import time
from typing import Any, Mapping

from absl import logging


class MetricWriter:
  """Writes to `workdir/tensorboard` (event files) and `workdir/metrics.jsonl`.

  On processes other than 0 (`just_logging=True`) nothing is written to disk.
  """

  def __init__(self, workdir: str, *, just_logging: bool = False):
    self._tb = None
    self._jsonl = None
    if not just_logging:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      os.makedirs(workdir, exist_ok=True)
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    scalars = {k: float(v) for k, v in scalars.items()}
    logging.info("[%d] %s", step, ", ".join(f"{k}={v:.6g}" for k, v in scalars.items()))
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(k, v, step)
      self._jsonl.write(json.dumps({"step": step, "time": time.time(), **scalars}) + "\n")
      self._jsonl.flush()

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    if self._tb is not None:
      for k, v in texts.items():
        self._tb.add_text(k, v, step)

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    flat = {k: (v if isinstance(v, (int, float, str, bool)) else str(v))
            for k, v in hparams.items()}
    if self._tb is not None:
      self._tb.add_text("hparams", "\n".join(f"    {k} = {v}" for k, v in sorted(flat.items())),
                        0)

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()
      self._jsonl.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._jsonl.close()
      self._tb = None
