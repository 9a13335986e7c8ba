"""Golden numbers (scripts/golden.py): the first training losses, a validation PPL and a few
sampled tokens of every embedded preset, pinned in tests/golden.json. A change that moves
them fails here until the pin is regenerated (`python scripts/golden.py --write`) in the
same change, with the README tables and docs that quote trained numbers
(scripts/reproduce_results.py, scripts/digits_results.py)."""
import importlib.util
import json
import os

import numpy as np
import pytest

from conftest import REPO_ROOT

_spec = importlib.util.spec_from_file_location("golden", os.path.join(REPO_ROOT, "scripts",
                                                                      "golden.py"))
golden = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(golden)


def _pinned():
  with open(golden.GOLDEN_PATH) as f:
    return json.load(f)


def test_every_embedded_preset_is_pinned():
  assert sorted(_pinned()) == sorted(f"{n}:{p}" for n, p in golden.PRESETS)
  for values in _pinned().values():
    assert len(values["train_loss"]) == golden.STEPS and len(values["val_ppl"]) == 1
    assert len(values["sample_tokens"]) == golden.SAMPLE_TOKENS


@pytest.mark.slow
@pytest.mark.parametrize("name,preset", golden.PRESETS)
def test_golden_numbers_have_not_moved(name, preset):
  want = _pinned()[f"{name}:{preset}"]
  got = golden.compute(name, preset)
  hint = "regenerate with `python scripts/golden.py --write` (and the README tables) if intended"
  np.testing.assert_allclose(got["train_loss"], want["train_loss"], rtol=2e-6, err_msg=hint)
  np.testing.assert_allclose(got["val_ppl"], want["val_ppl"], rtol=2e-6, err_msg=hint)
  assert got["sample_tokens"] == want["sample_tokens"], hint
