"""The model-family registry: its contract, and a new family joining it end to end.

`toy_family.py` is the family docs/adding_a_family.md walks through; here it joins the
registry with one line and then trains, evaluates and samples through the unchanged
programs (`pgm_jax.main`)."""
import json
import os

import jax
import numpy as np
import pytest

import toy_family
from conftest import REPO_ROOT, load_config
from pgm_jax import experiment, families, main
from pgm_jax.families.base import Family

PRESETS = {"pgm": ("shakespeare", "tiny"), "mdlm": ("shakespeare", "tiny,mdlm"),
           "ar": ("shakespeare", "tiny,ar"), "pgm_block": ("shakespeare", "tiny,pgm_block,b=8"),
           "pgm_image": ("digits", "tiny"),
           "maskgit": ("digits", "tiny,maskgit")}


def test_every_family_is_registered_under_its_name():
  assert set(families.REGISTRY) == set(PRESETS)
  for kind, family in families.REGISTRY.items():
    assert isinstance(family, Family) and family.name == kind
    assert family.default_sampler in family.samplers
    assert family.modality in ("text", "image")
    assert families.get(kind) is family


def test_an_unknown_kind_is_one_line():
  with pytest.raises(ValueError, match=r"config.model.kind must be one of \("
                     r"'pgm', 'pgm_block', 'mdlm', 'ar', 'pgm_image', 'maskgit'\), got 'gpt'"):
    families.get("gpt")


@pytest.mark.parametrize("kind", sorted(PRESETS))
def test_a_family_builds_what_its_preset_trains(kind):
  """The family's model, init arguments and the setup's abstract state agree."""
  config = load_config(*PRESETS[kind])
  assert config.model.kind == kind
  setup = experiment.make_setup(config)
  assert setup.family is families.get(kind)
  assert type(setup.model) is type(families.build_model(setup.model_cfg))
  params = jax.eval_shape(lambda r: setup.family.init_params(setup.model, r),
                          jax.random.key(0))
  want = jax.tree.map(lambda x: x.shape, setup.abstract_state.params)
  assert jax.tree.map(lambda x: x.shape, params) == want
  assert setup.model_cfg.causal == (kind == "ar")
  assert families.resolve_sampler(config) == setup.family.default_sampler


def test_family_checks_name_the_key():
  config = load_config("shakespeare", "tiny")
  config.model.time_conditioning = True
  with pytest.raises(ValueError, match="config.model.time_conditioning"):
    experiment.validate(config)
  config = load_config("digits", "tiny")
  config.model.register = 3
  with pytest.raises(ValueError, match="config.model.register=3"):
    experiment.validate(config)
  config = load_config("shakespeare", "tiny,ar")
  config.sample.sampler = "halton"
  with pytest.raises(ValueError, match="config.sample.sampler='halton' is not a ar sampler"):
    experiment.validate(config)


def test_a_new_family_joins_with_one_module_and_one_line(tmp_path, monkeypatch):
  """docs/adding_a_family.md, end to end: train, eval and sample a toy family through
  `python -m pgm_jax.main` (in process), nothing else changed."""
  monkeypatch.setitem(families.REGISTRY, "unigram", toy_family.FAMILY)   # the one line
  workdir = str(tmp_path / "unigram")
  config = f"--config={REPO_ROOT}/configs/shakespeare.py:tiny"
  common = [config, f"--workdir={workdir}", "--config.model.kind=unigram"]
  main.run(common + ["--config.train.num_steps=40", "--config.opt.lr=0.05",
                     "--config.train.log_every=10"])
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  losses = [r["train/loss"] for r in rows if "train/loss" in r]
  assert len(losses) >= 2 and losses[-1] < losses[0]   # it learns the unigram statistics
  main.run(common + ["--mode=eval"])
  with open(os.path.join(workdir, "eval.json")) as f:
    result = json.load(f)
  assert result["model"] == "unigram" and np.isfinite(result["val_ppl"])
  main.run(common + ["--mode=sample", "--config.sample.num_samples=2",
                     "--config.sample.steps=4"])
  with open(os.path.join(workdir, "samples.jsonl")) as f:
    samples = [json.loads(line) for line in f]
  assert len(samples) == 2 and all(s["sampler"] == "ddpm_cache" for s in samples)
