"""`hf:` sources (pgm_jax/io/hub.py) for convert, vq and convert_gpt2, offline.

Nothing is downloaded: each test builds a Hugging Face hub cache by hand in tmp_path, in the
layout `huggingface_hub.hf_hub_download` reads when it cannot (or may not) reach the Hub
(huggingface_hub 2.4.0, file_download.py: `refs/<branch>` holds the commit hash, the file
is `snapshots/<commit>/<path>`), and sets HF_HUB_CACHE and HF_HUB_OFFLINE=1. So the tests
run the library's real cache lookup, and a network call would fail rather than pass.
"""
import json
import os
import sys

import numpy as np
import pytest

from conftest import tiny_gpt2_state

from pgm_jax.io import hub

pytest.importorskip("huggingface_hub")

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def put_in_cache(cache, repo_id, files, commit=COMMIT, branch="main"):
  """A hub cache entry: models--OWNER--REPO/{refs/BRANCH, snapshots/COMMIT/FILE}.

  `files` maps a path in the repo to bytes or to a local file to copy. Returns the folder.
  """
  repo_dir = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
  snapshot = os.path.join(repo_dir, "snapshots", commit)
  for name, content in files.items():
    path = os.path.join(snapshot, *name.split("/"))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if isinstance(content, (str, os.PathLike)):
      with open(content, "rb") as f:
        content = f.read()
    with open(path, "wb") as f:
      f.write(content)
  os.makedirs(os.path.join(repo_dir, "refs"), exist_ok=True)
  with open(os.path.join(repo_dir, "refs", branch), "w") as f:
    f.write(commit)  # no newline: huggingface_hub reads the hash with f.read()
  return snapshot


@pytest.fixture
def cache(tmp_path, monkeypatch):
  """An empty hub cache, offline; returns its path."""
  path = str(tmp_path / "hf_cache")
  os.makedirs(path)
  monkeypatch.setenv("HF_HUB_CACHE", path)
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  return path


def test_syntax():
  assert hub.parse("hf:jdeschena/pgm/pgm_8_8.ckpt") == hub.Source(
      "jdeschena/pgm", "pgm_8_8.ckpt", None)
  assert hub.parse(f"hf:jdeschena/pgm/sub/dir/x.ckpt@{COMMIT}") == hub.Source(
      "jdeschena/pgm", "sub/dir/x.ckpt", COMMIT)
  assert hub.parse("hf:gpt2-large", repo=True) == hub.Source("gpt2-large", None, None)
  assert hub.parse("hf:openai-community/gpt2-large@v1", repo=True).revision == "v1"
  assert str(hub.parse("hf:a/b/c.pt@v2")) == "hf:a/b/c.pt@v2"
  for bad in ("hf:jdeschena/pgm", "hf:jdeschena//x.ckpt", "hf:a/b/c@", "hf:"):
    with pytest.raises(hub.HubError, match=r"^--from=hf:.*(expected hf:OWNER/REPO/PATH|empty)"):
      hub.parse(bad)
  with pytest.raises(hub.HubError, match=r"expected hf:\[OWNER/\]REPO"):
    hub.parse("hf:a/b/c/", repo=True)
  assert hub.resolve("local.ckpt") == "local.ckpt"          # not hf: -> unchanged
  assert not hub.is_hub("/tmp/hf:x")


def test_cache_and_offline_follow_the_environment(tmp_path, monkeypatch):
  monkeypatch.delenv("HF_HUB_CACHE", raising=False)
  monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
  monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
  assert hub.cache_dir() == str(tmp_path / "home" / "hub")
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "c"))
  assert hub.cache_dir() == str(tmp_path / "c")
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  assert hub.offline()
  monkeypatch.setenv("HF_HUB_OFFLINE", "0")
  assert not hub.offline()


def test_offline_miss_is_one_line(cache, tmp_path, capsys):
  put_in_cache(cache, "jdeschena/pgm", {"mdlm.ckpt": b"x"})
  path = hub.resolve("hf:jdeschena/pgm/mdlm.ckpt")            # a hit: the snapshot file
  assert path == os.path.join(cache, "models--jdeschena--pgm", "snapshots", COMMIT, "mdlm.ckpt")
  assert hub.resolve(f"hf:jdeschena/pgm/mdlm.ckpt@{COMMIT}") == path
  with pytest.raises(hub.HubError) as e:
    hub.resolve("hf:jdeschena/pgm/pgm_8_8.ckpt")
  msg = str(e.value)
  assert "\n" not in msg and msg.startswith("--from=hf:jdeschena/pgm/pgm_8_8.ckpt: ")
  assert "pgm_8_8.ckpt in jdeschena/pgm@main is not in the Hugging Face cache" in msg
  assert "HF_HUB_OFFLINE" in msg and cache in msg
  with pytest.raises(hub.HubError, match="not in the Hugging Face cache"):  # unknown repo
    hub.resolve("hf:nobody/nothing/x.pt@v3")
  # Through a command: one line on stderr, exit 1.
  from pgm_jax.tools import vq as vq_tool
  with pytest.raises(SystemExit) as e:
    vq_tool.main(["--from=hf:FoundationVision/LlamaGen/vq_ds8_c2i.pt",
                  f"--to={tmp_path / 'vq.npz'}"])
  err = capsys.readouterr().err.strip().splitlines()
  assert e.value.code == 1 and len(err) == 1, err
  assert err[0].startswith("pgm_jax.tools.vq: error: --from=hf:FoundationVision/LlamaGen/"
                           "vq_ds8_c2i.pt: vq_ds8_c2i.pt in FoundationVision/LlamaGen@main is "
                           "not in the Hugging Face cache")


def test_without_huggingface_hub_is_one_line(cache, tmp_path, monkeypatch, capsys):
  monkeypatch.setitem(sys.modules, "huggingface_hub", None)   # `import huggingface_hub` fails
  with pytest.raises(hub.HubError, match=r"^--from=hf:jdeschena/pgm/mdlm.ckpt: hf: sources "
                                         r"need huggingface_hub.*pip install 'pgm_jax\[hub\]'"):
    hub.resolve("hf:jdeschena/pgm/mdlm.ckpt")
  assert hub.resolve("local.ckpt") == "local.ckpt"            # local paths never need it
  from pgm_jax.tools import eval_assets
  with pytest.raises(SystemExit) as e:
    eval_assets.main(["convert_gpt2", "--from=hf:gpt2-large", f"--to={tmp_path / 'judge'}"])
  err = capsys.readouterr().err.strip().splitlines()
  assert e.value.code == 1 and len(err) == 1, err
  assert "pip install 'pgm_jax[hub]'" in err[0] and "--from=hf:gpt2-large" in err[0]


# ----------------------------------------------------------------------------
# The three tools, end to end from an offline cache.
# ----------------------------------------------------------------------------

def test_convert_text_checkpoint_from_hub(cache, tmp_path):
  """A tiny PGM in the authors' Lightning layout, as hf:jdeschena/pgm/pgm_8_8.ckpt."""
  torch = pytest.importorskip("torch")
  del torch
  import test_convert as tc  # pylint: disable=import-outside-toplevel
  from pgm_jax.tools import convert
  raw = tc.random_weights(tc.pgm_layout(), seed=0)
  ema = {k: v * 0.5 for k, v in raw.items()}
  tc.save_lightning(tmp_path / "local.ckpt", raw, ema, step=7)
  put_in_cache(cache, "jdeschena/pgm", {"pgm_8_8.ckpt": tmp_path / "local.ckpt"})
  cfg = tc.tiny_config(tc.write_vocab(tmp_path / "vocab.txt"), "pgm")
  lines = []
  info = convert.convert(cfg, "hf:jdeschena/pgm/pgm_8_8.ckpt", str(tmp_path / "wd"),
                         log=lines.append)
  assert info["step"] == 7 and info["source"].endswith(f"{COMMIT}/pgm_8_8.ckpt")
  assert lines[0].startswith("hf:jdeschena/pgm/pgm_8_8.ckpt -> ")
  _, step, state = tc.restore_full(cfg, str(tmp_path / "wd"))
  assert step == 7
  np.testing.assert_array_equal(
      np.asarray(state.params["encoder"]["blocks_1"]["attn_qkv"]["kernel"]),
      raw["encoder.blocks.1.attn_qkv.weight"].T)
  np.testing.assert_allclose(
      np.asarray(state.ema_params["encoder"]["blocks_1"]["attn_qkv"]["kernel"]),
      ema["encoder.blocks.1.attn_qkv.weight"].T)
  # A file the cache lacks: one line, and nothing written.
  with pytest.raises(ValueError, match="pgm_6_6_dim1024.ckpt in jdeschena/pgm@main is not in"):
    convert.convert(cfg, "hf:jdeschena/pgm/pgm_6_6_dim1024.ckpt", str(tmp_path / "wd2"),
                    log=lines.append)
  assert not os.path.exists(tmp_path / "wd2" / "checkpoints")


def test_vq_from_hub(cache, tmp_path, monkeypatch, capsys):
  """LlamaGen's layout ({"model": state dict}) as hf:FoundationVision/LlamaGen/vq_ds8_c2i.pt,
  at the reduced width of tests/test_vq.py (the command is pointed at that config)."""
  torch = pytest.importorskip("torch")
  import test_vq as tv  # pylint: disable=import-outside-toplevel
  from pgm_jax.models import vq
  from pgm_jax.tools import vq as vq_tool
  torch.manual_seed(0)
  state_dict = tv._randomize(tv.TorchVQ(tv.SMALL).eval(), 0).state_dict()
  torch.save({"model": state_dict, "steps": 1}, tmp_path / "vq_small.pt")
  put_in_cache(cache, "FoundationVision/LlamaGen", {"vq_ds8_c2i.pt": tmp_path / "vq_small.pt"})
  load = vq.load_params
  monkeypatch.setattr(vq, "load_params", lambda path, **kw: load(path, tv.SMALL, **kw))
  out = tmp_path / "vq.npz"
  vq_tool.main(["--from=hf:FoundationVision/LlamaGen/vq_ds8_c2i.pt", f"--to={out}"])
  printed = capsys.readouterr().out
  assert "hf:FoundationVision/LlamaGen/vq_ds8_c2i.pt -> " in printed and f"wrote {out}" in printed
  params, cfg = load(str(out))
  assert cfg == tv.SMALL
  want = vq.params_from_state_dict({k: v.clone() for k, v in state_dict.items()}, tv.SMALL)
  flat = lambda t: {"/".join(p): np.asarray(v) for p, v in vq._paths(t)}  # pylint: disable=protected-access
  want, got = flat(want), flat(params)
  assert sorted(want) == sorted(got)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_gpt2_judge_from_hub_repo(cache, tmp_path, capsys):
  """hf:openai-community/gpt2-large (config.json + model.safetensors) and hf:gpt2-large
  (no owner; config.json + pytorch_model.bin only) -> judges; n_head comes from config.json."""
  from safetensors.numpy import save_file
  from pgm_jax.evaluation import judges
  from pgm_jax.tools import eval_assets
  rng = np.random.default_rng(0)
  state = tiny_gpt2_state(rng)
  save_file({k: v.copy() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
  config = json.dumps({"n_head": 2, "n_embd": 32}).encode()  # 32 is no GPT-2 size: n_head needed
  put_in_cache(cache, "openai-community/gpt2-large",
               {"config.json": config, "model.safetensors": tmp_path / "model.safetensors"})
  out = tmp_path / "judge"
  eval_assets.main(["convert_gpt2", "--from=hf:openai-community/gpt2-large", f"--to={out}"])
  meta = json.load(open(out / "judge.json"))
  assert meta["source"] == "hf:openai-community/gpt2-large"
  assert meta["config"]["n_head"] == 2 and meta["config"]["n_layer"] == 1
  assert "hf:openai-community/gpt2-large -> " in capsys.readouterr().out
  # The weights as a pickle only (older repos), under a name without an owner.
  torch = pytest.importorskip("torch")
  torch.save({k: torch.from_numpy(v.copy()) for k, v in state.items()}, tmp_path / "w.bin")
  put_in_cache(cache, "gpt2-large", {"config.json": config, "pytorch_model.bin": tmp_path / "w.bin"})
  meta = judges.convert_gpt2("hf:gpt2-large", str(tmp_path / "judge2"))
  assert meta["source"] == "hf:gpt2-large" and meta["config"]["n_head"] == 2
  # A repo holding neither weights file: one line naming both.
  put_in_cache(cache, "someone/gpt2-empty", {"config.json": config})
  with pytest.raises(hub.HubError, match=r"^--from=hf:someone/gpt2-empty: model.safetensors or "
                                         r"pytorch_model.bin in someone/gpt2-empty@main is not"):
    judges.convert_gpt2("hf:someone/gpt2-empty", str(tmp_path / "judge3"))
  assert not os.path.exists(tmp_path / "judge3" / "judge.json")
