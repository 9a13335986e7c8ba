"""Bad input to every CLI entry point: one line on stderr that names the culprit, a
non-zero exit, no traceback, and nothing that existed before is changed.

Each case runs an entry point in this process (`main.run`, `convert.run`,
`preprocess.main`, `tokenizers.main`, `eval_assets.main`: the same parsing and error
handling as `python -m ...`) against a folder of good data (a workdir with two
checkpoints and good output files, a preprocessed corpus, a converted-checkpoint
source, ...), hashed before and after. A few real subprocesses check the last-resort
handler at process level.
"""
import contextlib
import glob
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO_ROOT, load_config
from pgm_jax import evaluation, experiment, main, samplers
from pgm_jax.core import checkpointing, cli
from pgm_jax.tools import convert, eval_assets, preprocess, tokenizers

CONFIG = f"--config={REPO_ROOT}/configs/shakespeare.py:tiny"
BENCH = f"--config={REPO_ROOT}/configs/bench.py:cpu"
SP_MODEL = os.path.join(REPO_ROOT, "third_party", "sentencepiece", "shakespeare_bpe2048.model")


def _write_safetensors(path, tensors, header_extra=None):
  header, blobs, offset = {}, [], 0
  for name, value in tensors.items():
    data = np.ascontiguousarray(value, np.float32).tobytes()
    header[name] = {"dtype": "F32", "shape": list(value.shape),
                    "data_offsets": [offset, offset + len(data)]}
    blobs.append(data)
    offset += len(data)
  header.update(header_extra or {})
  head = json.dumps(header).encode()
  head += b" " * (-len(head) % 8)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def _corrupt(step_dir):
  for path in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True):
    with open(path, "r+b") as f:
      size = len(f.read())
      f.seek(0)
      f.write(b"\xff" * size)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """Good data that no failing command may change (hashed around every case)."""
  root = tmp_path_factory.mktemp("protected")
  d = {"root": str(root)}
  # A workdir with checkpoints 1 and 2 (an initial state: no training needed) and outputs.
  cfg = load_config("shakespeare", "tiny")
  setup = experiment.make_setup(cfg)
  state = experiment.init_state(setup, jax.random.key(0))
  for name in ("wd", "wd_corrupt"):
    manager = checkpointing.make_manager(checkpointing.checkpoint_dir(str(root / name)))
    for step in (1, 2):
      checkpointing.save(manager, step, state.replace(step=state.step + step), wait=True)
    manager.close()
  for step in (1, 2):
    _corrupt(str(root / "wd_corrupt" / "checkpoints" / str(step)))
  (root / "wd" / "config.json").write_text(cfg.to_json_best_effort(indent=2))
  (root / "wd" / "samples.jsonl").write_text('{"text": "good sample", "index": 0}\n')
  (root / "wd" / "eval.json").write_text('{"val_ppl": 123.0}\n')
  d["wd"], d["wd_corrupt"] = str(root / "wd"), str(root / "wd_corrupt")
  # The same weights under the reference's names, as a converter would read them.
  expected = convert.expected_torch_params(jax.device_get(state.params))
  flat = {convert._path_keys(p): np.asarray(v)  # pylint: disable=protected-access
          for p, v in jax.tree_util.tree_flatten_with_path(jax.device_get(state.params))[0]}
  _write_safetensors(root / "model.safetensors",
                     {n: flat[k].T if t else flat[k] for n, (k, _, t) in expected.items()})
  (root / "garbage.safetensors").write_bytes(b"garbage bytes, not a header" * 3)
  _write_safetensors(root / "offsets.safetensors", {"w": np.ones(4, np.float32)},
                     {"x": {"dtype": "F32", "shape": [1000], "data_offsets": [0, 4000]}})
  (root / "list.safetensors").write_bytes(struct.pack("<Q", 8) + b"[1, 2]  ")
  # A corpus, its good preprocessed output, and bad corpora.
  corpus = root / "corpus"
  corpus.mkdir()
  with open(corpus / "a.jsonl", "w") as f:
    for i in range(40):
      f.write(json.dumps({"text": f"Document {i}: to be or not to be, " * (i % 4 + 1)}) + "\n")
  (corpus / "plays.txt").write_text("ROMEO. But soft, what light through yonder window "
                                    "breaks?\n" * 50)
  (root / "bad.jsonl").write_text('{"text": "ok"}\n{"text": "ok too"}\nnot json at all\n')
  (root / "nokey.jsonl").write_text('{"body": "no text field"}\n')
  (root / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
  d["pp_out"] = str(root / "pp_out")
  preprocess.main([f"--source=jsonl:{corpus}/*.jsonl", "--tokenizer=sentencepiece",
                   f"--tokenizer_path={SP_MODEL}", "--seq_len=16", "--val_last_docs=5",
                   f"--out={d['pp_out']}"])
  # Odd paths.
  (root / "afile").write_text("a file, not a folder\n")
  (root / "bad_prompts.txt").write_text("To be[[3]]question\nROMEO.[[x]]\n")
  (root / "judge").mkdir()
  (root / "judge" / "judge.json").write_text('{"kind": "gpt2"}\n')
  (root / "garbage.model").write_bytes(b"\x00\x01 not a sentencepiece model")
  d.update(corpus=str(corpus), afile=str(root / "afile"))
  return d


def _hashes(root):
  out = {}
  for folder, _, files in os.walk(root):
    for name in files:
      path = os.path.join(folder, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
  return out


ENTRY = {"pgm_jax": main.run, "pgm_jax.tools.convert": convert.run,
         "pgm_jax.tools.preprocess": preprocess.main, "pgm_jax.tools.tokenizers": tokenizers.main,
         "pgm_jax.tools.eval_assets": eval_assets.main}


def _case(prog, args, culprit, code=None):
  return (prog, args, culprit, code)


# {placeholders} are filled from the `data` fixture and the scratch folder.
M = "pgm_jax"
CASES = [
    # --- pgm_jax.main: config keys ------------------------------------------------------
    _case(M, [CONFIG, "--workdir={wd}", "--config.mesh.shape=abc"], "config.mesh.shape", 1),
    _case(M, [CONFIG, "--workdir={wd}", "--config.mesh.shape=2,2,2"], "config.mesh.shape", 1),
    _case(M, [CONFIG, "--workdir={wd}", "--mode=sample", "--config.sample.top_p=0"],
          "config.sample.top_p", 1),
    _case(M, [CONFIG, "--workdir={wd}", "--mode=sample", "--config.sample.top_p=-0.5"],
          "config.sample.top_p", 1),
    _case(M, [CONFIG, "--workdir={wd}", "--mode=sample", "--config.sample.top_p=1.5"],
          "config.sample.top_p", 1),
    _case(M, [CONFIG, "--workdir={wd}", "--mode=sample", "--config.sample.temperature=-1"],
          "config.sample.temperature", 1),
    _case(M, [CONFIG, "--workdir={wd}", "--mode=sample", "--config.sample.temperature=nan"],
          "config.sample.temperature", 1),
    _case(M, [CONFIG, "--workdir={wd}", "--mode=sample", "--config.sample.num_samples=0"],
          "config.sample.num_samples", 1),
    _case(M, [CONFIG, "--workdir={wd}", "--mode=sample", "--config.sample.num_samples=-4"],
          "config.sample.num_samples", 1),
    _case(M, [CONFIG, "--workdir={wd}", "--mode=sample", "--config.sample.batch_size=0"],
          "config.sample.batch_size", 1),
    _case(M, [CONFIG, "--workdir={wd}", "--mode=sample", "--config.sample.prompt=ROMEO.[[abc]]"],
          "config.sample.prompt", 1),
    _case(M, [CONFIG, "--workdir={wd}", "--mode=sample", "--config.sample.prompt=To be[[5]"],
          "config.sample.prompt", 1),
    _case(M, [CONFIG, "--workdir={wd}", "--mode=sample", "--config.sample.prompt=To be]]x"],
          "config.sample.prompt", 1),
    _case(M, [CONFIG, "--workdir={wd}", "--mode=sample", "--config.sample.prompt=a[[ 5 ]]b"],
          "config.sample.prompt", 1),
    _case(M, [CONFIG, "--workdir={wd}", "--mode=sample", "--config.sample.prompt=[[-2]]"],
          "config.sample.prompt", 1),
    _case(M, [CONFIG, "--workdir={wd}", "--mode=sample", "--config.sample.prompt=x[[200]]"],
          "config.sample.prompt", 1),
    _case(M, [CONFIG, "--workdir={wd}", "--mode=sample",
              "--config.sample.prompt_file={root}/bad_prompts.txt"], "line 2", 1),
    _case(M, [CONFIG, "--workdir={wd}", "--mode=sample",
              "--config.sample.prompt_file={root}/nope.txt"], "config.sample.prompt_file", 1),
    _case(M, [CONFIG, "--workdir={wd}", "--mode=sample", "--config.sample.steps=0"],
          "config.sample.steps", 1),
    _case(M, [CONFIG, "--workdir={wd}", "--mode=sample", "--config.sample.sampler=ddpm"],
          "config.sample.sampler", 1),
    _case(M, [CONFIG, "--workdir={wd}", "--mode=sample",
              "--config.sample.sampler=confidence-threshold", "--config.sample.threshold=1.5"],
          "config.sample.threshold", 1),
    _case(M, [CONFIG, "--workdir={wd}", "--mode=sample",
              "--config.sample.sampler=confidence-threshold", "--config.sample.threshold=nan"],
          "config.sample.threshold", 1),
    _case(M, [CONFIG, "--workdir={wd}", "--config.opt.lr=-0.001"], "config.opt.lr", 1),
    _case(M, [CONFIG, "--workdir={wd}", "--config.opt.b1=1.5"], "config.opt.b1", 1),
    _case(M, [CONFIG, "--workdir={wd}", "--config.opt.ema_decay=1.0"], "config.opt.ema_decay", 1),
    _case(M, [CONFIG, "--workdir={wd}", "--config.opt.warmup_steps=-1"],
          "config.opt.warmup_steps", 1),
    _case(M, [CONFIG, "--workdir={wd}", "--config.opt.grad_clip=-1"], "config.opt.grad_clip", 1),
    _case(M, [CONFIG, "--workdir={scratch}/plan", "--mode=plan", "--config.plan.num_devices=0"],
          "config.plan.num_devices", 1),
    _case(M, [CONFIG, "--workdir={scratch}/plan", "--mode=plan", "--config.plan.num_devices=-2"],
          "config.plan.num_devices", 1),
    _case(M, [CONFIG, "--workdir={scratch}/plan", "--mode=plan", "--config.plan.topology=v9-99"],
          "config.plan.topology", 1),
    _case(M, [BENCH, "--workdir={scratch}/bench", "--mode=bench", "--config.bench.steps=0"],
          "config.bench.steps", 1),
    _case(M, [BENCH, "--workdir={scratch}/bench", "--mode=bench", "--config.bench.repeats=0"],
          "config.bench.repeats", 1),
    _case(M, [CONFIG, "--workdir={wd}", "--config.data.seq_len=2"], "config.data.seq_len", 1),
    _case(M, [CONFIG, "--workdir={wd}", "--config.train.batch_size=0"],
          "config.train.batch_size", 1),
    _case(M, [CONFIG, "--workdir={wd}", "--config.train.grad_accum_steps=3"],
          "config.train.grad_accum_steps", 1),
    _case(M, [CONFIG, "--workdir={wd}", "--config.train.num_steps=-1"],
          "config.train.num_steps", 1),
    _case(M, [CONFIG, "--workdir={wd}", "--config.train.log_every=0"], "config.train.log_every", 1),
    _case(M, [CONFIG, "--workdir={wd}", "--config.model.num_heads=3"], "config.model.num_heads", 1),
    _case(M, [CONFIG, "--workdir={wd}", "--config.model.kind=gpt"], "config.model.kind", 1),
    _case(M, [CONFIG, "--workdir={wd}", "--config.model.dropout=1.5"], "config.model.dropout", 1),
    _case(M, [CONFIG, "--workdir={wd}", "--config.attn.impl=cuda"], "config.attn.impl", 1),
    _case(M, [CONFIG, "--workdir={wd}", "--config.eval.max_batches=0"],
          "config.eval.max_batches", 1),
    _case(M, [CONFIG, "--workdir={wd}", "--config.data.tokenizer_path={root}/nope.model"],
          "config.data.tokenizer_path", 1),
    _case(M, [CONFIG, "--workdir={wd}", "--config.data.tokenizer_path={root}/garbage.model"],
          "config.data.tokenizer_path", 1),
    _case(M, [CONFIG, "--workdir={scratch}/ar", "--config.data.name=array_record",
              "--config.data.data_dir={root}/nope"], "config.data.data_dir", 1),
    _case(M, [CONFIG, "--workdir={scratch}/rf", "--config.ckpt.restore_from={root}/nope"],
          "config.ckpt.restore_from", 1),
    # --- pgm_jax.main: flags, workdirs, checkpoints --------------------------------------
    _case(M, [CONFIG, "--workdir={wd}", "--config.train.nsteps=3"], "nsteps", 2),
    _case(M, [f"{CONFIG},bogus", "--workdir={wd}"], "bogus", 2),
    _case(M, ["--config=configs/nope.py", "--workdir={wd}"], "configs/nope.py", None),
    _case(M, [CONFIG, "--workdir={wd}", "--mode=serve"], "--mode", 2),
    _case(M, [CONFIG], "--workdir", 2),
    _case(M, [CONFIG, "--workdir={wd}", "stray"], "stray", 2),
    _case(M, [CONFIG, "--workdir={afile}"], "--workdir", 1),
    _case(M, [CONFIG, "--workdir={afile}", "--mode=eval"], "--workdir", 1),
    _case(M, [CONFIG, "--workdir={afile}/sub"], "--workdir", 1),
    _case(M, [CONFIG, "--workdir={scratch}/empty", "--mode=eval"], "--workdir", 1),
    _case(M, [CONFIG, "--workdir={scratch}/empty", "--mode=sample"], "--workdir", 1),
    _case(M, [CONFIG, "--workdir={wd_corrupt}", "--mode=eval"], "--workdir", 1),
    _case(M, [CONFIG, "--workdir={wd}", "--mode=eval", "--config.eval.gen_ppl=True"],
          "config.eval.judge_workdir", 1),
    _case(M, [CONFIG, "--workdir={wd}", "--mode=eval", "--config.eval.gen_ppl=True",
              "--config.eval.judge_workdir={root}/nope"], "config.eval.judge_workdir", 1),
    _case(M, [CONFIG, "--workdir={wd}", "--mode=eval", "--config.eval.gen_ppl=True",
              "--config.eval.judge_workdir={wd}"], "config.eval.judge_workdir", 1),
    _case(M, [CONFIG, "--workdir={wd}", "--mode=eval", "--config.model.hidden=32"],
          "config.model", 1),
    # --- pgm_jax.tools.preprocess ------------------------------------------------------------
    _case("pgm_jax.tools.preprocess", ["--out={pp_out}"], "--source", 2),
    _case("pgm_jax.tools.preprocess", ["--source=jsonl:{root}/typo/*.jsonl", "--out={pp_out}",
                                 "--tokenizer=sentencepiece", "--seq_len=16"], "--source", 1),
    _case("pgm_jax.tools.preprocess", ["--source=csv:{corpus}/a.jsonl", "--out={pp_out}"],
          "--source", 1),
    _case("pgm_jax.tools.preprocess", ["--source=jsonl:{root}/bad.jsonl", "--out={pp_out}",
                                 "--tokenizer=sentencepiece", "--seq_len=16",
                                 "--val_last_docs=1"], "bad.jsonl line 3", 1),
    _case("pgm_jax.tools.preprocess", ["--source=jsonl:{corpus}/a.jsonl", "--out={pp_out}",
                                 "--tokenizer=sentencepiece", "--text_key=body",
                                 "--val_last_docs=1"], "--text_key", 1),
    _case("pgm_jax.tools.preprocess", ["--source=jsonl:{root}/nokey.jsonl", "--out={pp_out}",
                                 "--tokenizer=sentencepiece", "--val_last_docs=1"],
          "--text_key", 1),
    _case("pgm_jax.tools.preprocess", ["--source=text:{root}/latin1.txt", "--out={pp_out}",
                                 "--tokenizer=sentencepiece", "--val_last_docs=1"],
          "latin1.txt", 1),
    _case("pgm_jax.tools.preprocess", ["--source=jsonl:{corpus}/a.jsonl", "--out={pp_out}",
                                 "--tokenizer=sentencepiece", "--seq_len=2"], "--seq_len", 1),
    _case("pgm_jax.tools.preprocess", ["--source=jsonl:{corpus}/a.jsonl", "--out={pp_out}",
                                 "--seq_len=abc"], "--seq_len", 2),
    _case("pgm_jax.tools.preprocess", ["--source=jsonl:{corpus}/a.jsonl", "--out={pp_out}",
                                 "--tokenizer=sentencepiece", "--val_last_docs=-1"],
          "--val_last_docs", 1),
    _case("pgm_jax.tools.preprocess", ["--source=jsonl:{corpus}/a.jsonl", "--out={pp_out}",
                                 "--tokenizer=sentencepiece", "--val_last_docs=3",
                                 "--val_source=jsonl:{corpus}/a.jsonl"], "--val_last_docs", 1),
    _case("pgm_jax.tools.preprocess", ["--source=jsonl:{corpus}/a.jsonl", "--out={pp_out}",
                                 "--tokenizer=sentencepiece", "--seq_len=16",
                                 "--val_last_docs=1000"], "--val_last_docs", 1),
    _case("pgm_jax.tools.preprocess", ["--source=jsonl:{corpus}/a.jsonl", "--out={pp_out}",
                                 "--tokenizer=sentencepiece", "--val_last_docs=1",
                                 "--chunk_docs=0"], "--chunk_docs", 1),
    _case("pgm_jax.tools.preprocess", ["--source=jsonl:{corpus}/a.jsonl", "--out={afile}",
                                 "--tokenizer=sentencepiece", "--val_last_docs=1"], "--out", 1),
    _case("pgm_jax.tools.preprocess", ["--source=jsonl:{corpus}/a.jsonl", "--out={pp_out}",
                                 "--tokenizer=word2vec"], "--tokenizer", 2),
    _case("pgm_jax.tools.preprocess", ["--source=jsonl:{corpus}/a.jsonl", "--out={pp_out}",
                                 "--tokenizer=sentencepiece", "--tokenizer_path={root}/nope",
                                 "--val_last_docs=1"], "--tokenizer_path", 1),
    _case("pgm_jax.tools.preprocess", ["--source=jsonl:{corpus}/a.jsonl", "--out={pp_out}",
                                 "--tokenizer=sentencepiece",
                                 "--tokenizer_path={root}/garbage.model",
                                 "--val_last_docs=1"], "--tokenizer_path", 1),
    _case("pgm_jax.tools.preprocess", ["--source=imagefolder:{root}/images", "--tokenizer=vq_ds8",
                                 "--out={pp_out}"], "--tokenizer_path", 2),
    _case("pgm_jax.tools.preprocess", ["--source=imagefolder:{root}/images", "--tokenizer=vq_ds8",
                                 "--tokenizer_path={root}/no_such_vq.npz", "--out={pp_out}"],
          "no_such_vq.npz", 1),
    # --- pgm_jax.tools.tokenizers ------------------------------------------------------------
    _case("pgm_jax.tools.tokenizers", ["train", "--input={root}/typo/*.txt",
                                 "--model_prefix={scratch}/sp"], "--input", 1),
    _case("pgm_jax.tools.tokenizers", ["train", "--input={corpus}/plays.txt"], "--model_prefix", 2),
    _case("pgm_jax.tools.tokenizers", ["train", "--input={corpus}/plays.txt", "--vocab_size=0",
                                 "--model_prefix={scratch}/sp"], "--vocab_size", 1),
    _case("pgm_jax.tools.tokenizers", ["train", "--input={corpus}/plays.txt", "--vocab_size=50000",
                                 "--model_prefix={scratch}/sp"], "--vocab_size", 1),
    _case("pgm_jax.tools.tokenizers", ["train", "--input={corpus}/plays.txt", "--exclude=hamlet",
                                 "--model_prefix={scratch}/sp"], "hamlet", 1),
    _case("pgm_jax.tools.tokenizers", ["train", "--input={corpus}/plays.txt", "--exclude=plays",
                                 "--model_prefix={scratch}/sp"], "--input", 1),
    _case("pgm_jax.tools.tokenizers", ["train", "--input={corpus}/plays.txt",
                                 "--character_coverage=2", "--model_prefix={scratch}/sp"],
          "--character_coverage", 1),
    _case("pgm_jax.tools.tokenizers", ["train", "--input={corpus}/plays.txt",
                                 "--model_prefix={afile}/sp"], "--model_prefix", 1),
    _case("pgm_jax.tools.tokenizers", ["train", "--input={corpus}/plays.txt",
                                 "--model_type=wordpiece", "--model_prefix={scratch}/sp"],
          "--model_type", 2),
    _case("pgm_jax.tools.tokenizers", ["encode", "--tokenizer_path={root}/nope.model", "hello"],
          "--tokenizer_path", 1),
    _case("pgm_jax.tools.tokenizers", ["encode", "--tokenizer=bert_wordpiece", "hello"],
          "--tokenizer_path", 1),
    _case("pgm_jax.tools.tokenizers", [], "cmd", 2),
    # --- pgm_jax.tools.convert ---------------------------------------------------------------
    _case("pgm_jax.tools.convert", [CONFIG, "--from={root}/garbage.safetensors",
                              "--to={scratch}/conv"], "garbage.safetensors", 1),
    _case("pgm_jax.tools.convert", [CONFIG, "--from={root}/offsets.safetensors",
                              "--to={scratch}/conv"], "offsets.safetensors", 1),
    _case("pgm_jax.tools.convert", [CONFIG, "--from={root}/list.safetensors",
                              "--to={scratch}/conv"], "list.safetensors", 1),
    _case("pgm_jax.tools.convert", [CONFIG, "--from={root}/nope.safetensors",
                              "--to={scratch}/conv"], "--from", 1),
    _case("pgm_jax.tools.convert", [CONFIG, "--from={root}/model.safetensors",
                              "--to={wd}"], "already holds checkpoint", 1),
    _case("pgm_jax.tools.convert", [CONFIG, "--from={root}/model.safetensors",
                              "--to={afile}"], "--to", 1),
    _case("pgm_jax.tools.convert", [CONFIG, "--from={root}/model.safetensors"], "--to", 2),
    _case("pgm_jax.tools.convert", [CONFIG, "--from={root}/model.safetensors", "--to={scratch}/conv",
                              "--ema_only", "--raw_only"], "--raw_only", 1),
    _case("pgm_jax.tools.convert", [CONFIG, "--from={root}/model.safetensors", "--to={scratch}/conv",
                              "--step=-1"], "--step", 1),
    _case("pgm_jax.tools.convert", [CONFIG, "--from={root}/model.safetensors", "--to={scratch}/conv",
                              "--config.model.hidden=32"], "config.model", 1),
    _case("pgm_jax.tools.convert", [CONFIG, "--from={root}/model.safetensors", "--to={scratch}/conv",
                              "--config.model.enc_layers=2"], "missing keys", 1),
    _case("pgm_jax.tools.convert", [CONFIG, "--from={root}/model.safetensors", "--to={scratch}/conv",
                              "--config.data.seq_len=1"], "config.data.seq_len", 1),
    # --- pgm_jax.tools.eval_assets ------------------------------------------------------------
    _case("pgm_jax.tools.eval_assets", ["convert_gpt2", "--from={root}/nope", "--to={scratch}/judge"],
          "--from", 1),
    _case("pgm_jax.tools.eval_assets", ["convert_gpt2", "--from={root}/model.safetensors",
                                 "--to={scratch}/judge"], "--from", 1),
    _case("pgm_jax.tools.eval_assets", ["convert_gpt2", "--from={root}/garbage.safetensors",
                                 "--to={scratch}/judge"], "garbage.safetensors", 1),
    _case("pgm_jax.tools.eval_assets", ["convert_gpt2", "--from={root}/model.safetensors",
                                 "--to={root}/judge"], "--to", 1),
    _case("pgm_jax.tools.eval_assets", ["convert_gpt2", "--from={root}/model.safetensors",
                                 "--to={scratch}/judge", "--n_head=0"], "--n_head", 1),
    _case("pgm_jax.tools.eval_assets", ["convert_gpt2", "--from={root}/model.safetensors"], "--to", 2),
    _case("pgm_jax.tools.eval_assets", ["convert_inception", "--from={root}/x.pth",
                                 "--to={scratch}/inception.txt"], "--to", 1),
    _case("pgm_jax.tools.eval_assets", ["fid_stats", "--images={root}/no_such_images",
                                 "--weights={root}/x.npz", "--to={scratch}/s.npz"],
          "no_such_images", 1),
    _case("pgm_jax.tools.eval_assets", [], "command", 2),
]
PARAMS = [pytest.param(*c, id=f"{i:02d}-{c[0].split('.')[-1]}-{c[2]}") for i, c in enumerate(CASES)]


def _invoke(prog, argv, capsys):
  capsys.readouterr()
  with pytest.raises(SystemExit) as e:
    ENTRY[prog](argv)
  return e.value.code, capsys.readouterr().err


def _check_one_line(prog, code, err, culprit, want_code):
  assert code not in (0, None), err[-2000:]                       # never silent
  if want_code is not None:
    assert code == want_code, err[-2000:]
  assert "Traceback" not in err, err[-4000:]                      # never a traceback
  prefix = prog.replace("python -m ", "")
  errors = [l for l in err.splitlines() if ": error: " in l and l.startswith(prefix)]
  assert len(errors) == 1, err[-2000:]                            # one line
  assert culprit in errors[0], errors[0]                          # names the culprit
  return errors[0]


@pytest.mark.parametrize("prog,args,culprit,code", PARAMS)
def test_bad_input_is_one_line(prog, args, culprit, code, data, tmp_path, capsys):
  fill = dict(data, scratch=str(tmp_path))
  argv = [a.format(**fill) for a in args]
  before = _hashes(data["root"])
  got, err = _invoke(prog, argv, capsys)
  _check_one_line(prog, got, err, culprit, code)
  assert _hashes(data["root"]) == before                          # nothing existing changed


def test_case_count():
  assert len(CASES) >= 60
  assert {c[0] for c in CASES} == set(ENTRY)


@contextlib.contextmanager
def _read_only(path):
  """A folder nobody can write into (chmod for a user; chattr +i for root), or skip."""
  if os.geteuid() != 0:
    os.chmod(path, 0o555)
    try:
      yield
    finally:
      os.chmod(path, 0o755)
    return
  if shutil.which("chattr") is None or subprocess.run(
      ["chattr", "+i", path], capture_output=True, check=False).returncode != 0:
    pytest.skip("cannot make a folder read-only here (root without chattr +i)")
  try:
    yield
  finally:
    subprocess.run(["chattr", "-i", path], check=True)


@pytest.mark.parametrize("mode", ["eval", "sample"])
def test_read_only_workdir_fails_before_any_work(mode, data, tmp_path, capsys):
  wd = str(tmp_path / "ro")
  shutil.copytree(data["wd"], wd)
  before = _hashes(wd)
  with _read_only(wd):
    code, err = _invoke("pgm_jax", [CONFIG, f"--workdir={wd}", f"--mode={mode}"], capsys)
  line = _check_one_line("pgm_jax", code, err, "--workdir", 1)
  assert "not writable" in line
  assert _hashes(wd) == before


def test_unexpected_error_points_to_the_full_traceback(data, tmp_path, capsys, monkeypatch):
  """The last-resort handler: a bug (here an injected one) is still one line, with the
  path of a file that holds the full traceback."""
  def boom(*args, **kwargs):
    raise RuntimeError("injected failure\nsecond line")

  monkeypatch.setattr(preprocess, "_convert", boom)
  code, err = _invoke("pgm_jax.tools.preprocess", [
      f"--source=jsonl:{data['corpus']}/a.jsonl", f"--out={tmp_path}/out",
      "--tokenizer=sentencepiece", "--val_last_docs=1"], capsys)
  line = _check_one_line("pgm_jax.tools.preprocess", code, err, "unexpected RuntimeError", 1)
  path = line.split("full traceback in ")[1].split(";")[0]
  assert "injected failure" in open(path).read() and "Traceback" in open(path).read()
  os.remove(path)
  assert not os.listdir(tmp_path / "out")  # no partial output, no temporary files


def _subprocess(args, **env):
  return subprocess.run([sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True,
                        timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu", **env))


@pytest.mark.slow
@pytest.mark.subprocess
def test_process_level_errors_are_one_line(data, tmp_path):
  """Real processes (`python -m ...`): the exit code and stderr a user sees."""
  runs = [
      ("pgm_jax.tools.preprocess", ["-m", "pgm_jax.tools.preprocess", "--source=jsonl:/typo/*.jsonl",
                              f"--out={data['pp_out']}"], "--source"),
      ("pgm_jax.tools.tokenizers", ["-m", "pgm_jax.tools.tokenizers", "train", "--input=/typo/*.txt",
                              f"--model_prefix={tmp_path}/sp"], "--input"),
      ("pgm_jax.tools.convert", ["-m", "pgm_jax.tools.convert", CONFIG,
                           f"--from={data['root']}/garbage.safetensors", f"--to={tmp_path}/c"],
       "garbage.safetensors"),
      ("pgm_jax", ["-m", "pgm_jax.main", CONFIG, f"--workdir={data['wd']}", "--mode=sample",
                   "--config.sample.top_p=0"], "config.sample.top_p"),
      # The last-resort handler of a real entry point, around an injected bug.
      ("pgm_jax.tools.tokenizers", ["-c", "import sys; from pgm_jax.data import tokenizers as t; "
                              "from pgm_jax.tools import tokenizers as cli; "
                              "t.expand_inputs = lambda *a, **k: {}['no such key']; "
                              "cli.main(sys.argv[1:])", "train", "--input=x",
                              f"--model_prefix={tmp_path}/sp"], "unexpected KeyError"),
  ]
  before = _hashes(data["root"])
  for prog, args, culprit in runs:
    res = _subprocess(args)
    _check_one_line(prog, res.returncode, res.stderr, culprit, None)
  assert _hashes(data["root"]) == before


def test_corrupt_latest_checkpoint_falls_back(data, tmp_path, capsys, caplog):
  """eval on a workdir whose latest step is corrupt: the previous kept step, a warning that
  names the bad one, and nothing moved or deleted (eval never writes checkpoints)."""
  wd = str(tmp_path / "wd")
  shutil.copytree(data["wd"], wd)
  _corrupt(os.path.join(wd, "checkpoints", "2"))
  before = {k: v for k, v in _hashes(wd).items() if k.startswith("checkpoints")}
  cfg = load_config("shakespeare", "tiny")
  setup = experiment.make_setup(cfg)
  step, params = experiment.restore_eval_params(setup, wd)
  assert step == 1 and params is not None
  assert any("step 2" in r.getMessage() and "not deleted" in r.getMessage()
             for r in caplog.records)
  assert {k: v for k, v in _hashes(wd).items() if k.startswith("checkpoints")} == before
  assert "Traceback" not in capsys.readouterr().err
  # Every step bad: one line naming the workdir, nothing deleted.
  _corrupt(os.path.join(wd, "checkpoints", "1"))
  with pytest.raises(ValueError, match="--workdir: no checkpoint in .* restores"):
    experiment.restore_eval_params(setup, wd)
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["1", "2"]


def test_sampling_parameters_temperature_zero_is_greedy():
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  logits = jnp.asarray([[0.1, 2.0, -1.0, 1.9, 0.0]])
  logp = samplers.filtered_log_probs(logits, mask_id=4, temperature=0.0)
  assert np.isfinite(np.asarray(logp)).sum() == 1 and int(jnp.argmax(logp)) == 1
  for seed in range(5):  # a Gumbel-max draw from it is always the argmax
    draw = samplers.keyed_gumbel_argmax(jax.random.key(seed), logp[None], jnp.asarray([0]),
                                        jnp.asarray([[3]]))
    assert int(draw[0, 0]) == 1


def test_prompt_gaps_and_escapes():
  assert samplers.split_prompt("To be[[3]]question") == ["To be", 3, "question"]
  assert samplers.split_prompt(r"a \[[3\]] b \]] c") == ["a [[3]] b ]] c"]
  assert samplers.split_prompt("[[0]]x[[12]]") == [0, "x", 12]
  for bad in ("a[[x]]", "a[[3]", "]]", "[[ 3 ]]", "[[]]", "a[[-1]]b"):
    with pytest.raises(ValueError, match=r"config\.sample\.prompt: malformed gap"):
      samplers.split_prompt(bad)


def test_cli_one_line_helper():
  assert cli.one_line(KeyError("config.x")) == "config.x"
  assert cli.one_line(ValueError("first\nsecond\nlast")) == "first last"
  assert cli.one_line(ValueError("no files match '/a/*.txt'")) == "no files match '/a/*.txt'"
