"""ImageNet codes: image transform, `python -m pgm_jax.tools.preprocess --tokenizer=vq_ds8`, and the
`imagenet_codes` Grain pipeline, on a tiny image folder and a tiny random VQ made here.

The VQ has the VQ-8 structure at toy size (one downsampling, 8x8 images -> 4x4 codes,
codebook 64) so that the whole module compiles one small encoder; the records'
codes are checked against that VQ's own `encode` of the same transformed images.
"""
import dataclasses
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from pgm_jax.data import imagenet, pipeline
from pgm_jax.tools import imagenet_codes
from pgm_jax.tools import preprocess as preprocess_lib
from pgm_jax.models import vq as vq_lib

TINY = vq_lib.VQConfig(codebook_size=64, codebook_dim=8, ch=32, ch_mult=(1, 1), num_res_blocks=1,
                       z_channels=8)
SIZE = 8                    # image side after resize + crop
SEQ = 1 + (SIZE // 2) ** 2  # BOS + 4x4 codes


def _write_folder(root, classes, per_class, seed):
  rng = np.random.default_rng(seed)
  for c in classes:
    os.makedirs(root / c, exist_ok=True)
    for i in range(per_class):
      h, w = rng.integers(9, 20, size=2)  # odd, non-square sizes: resize + crop both act
      mode = "L" if i == 1 else "RGB"     # a greyscale file is converted to RGB
      arr = rng.integers(0, 256, size=(h, w) if mode == "L" else (h, w, 3), dtype=np.uint8)
      Image.fromarray(arr, mode).save(root / c / f"img_{i}.png")
  (root / classes[0] / "notes.txt").write_text("not an image")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  root = tmp_path_factory.mktemp("imagenet")
  _write_folder(root / "train", ["n01", "n02", "n03"], 3, 0)
  _write_folder(root / "val", ["n01", "n03"], 2, 1)  # a class may have no val images
  rng = np.random.default_rng(0)  # random weights without compiling an init
  params = jax.tree.map(lambda a: rng.normal(0, 0.3, a.shape).astype(np.float32),
                        vq_lib.abstract_params(TINY))
  npz = str(root / "vq_tiny.npz")
  vq_lib.save_npz(params, npz, TINY)
  out = str(root / "codes")
  preprocess_lib.main([f"--source=imagefolder:{root}/train", f"--val_source=imagefolder:{root}/val",
                       "--tokenizer=vq_ds8", f"--tokenizer_path={npz}", f"--out={out}",
                       f"--image_size={SIZE}", "--batch_size=4", "--num_workers=2",
                       "--hflip=copy"])
  return root, out, vq_lib.load_vq(npz)


def test_resize_center_crop_follows_torchvision_rules():
  img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 45, 3), np.uint8))
  out = imagenet.resize_center_crop(img, 16)
  # shorter side 30 -> 16, longer int(16 * 45 / 30) = 24; crop left round((24 - 16) / 2) = 4
  want = img.resize((24, 16), Image.BILINEAR).crop((4, 0, 20, 16))
  np.testing.assert_array_equal(np.asarray(out), np.asarray(want))
  tall = Image.fromarray(np.zeros((41, 20, 3), np.uint8))
  assert imagenet.resize_center_crop(tall, 16).size == (16, 16)
  assert imagenet.load_image(np.zeros((5, 7), np.uint8), None).shape == (5, 7, 3)


def _encode(vq, images):
  """The VQ's codes of images [N, 8, 8, 3], flattened, through the same 4-row program."""
  enc = imagenet_codes._Encoder(vq, 4)  # pylint: disable=protected-access
  return np.concatenate([enc(images[i:i + 4]) for i in range(0, len(images), 4)]).reshape(
      len(images), -1)


def test_records_and_meta(built):
  root, out, vq = built
  meta = json.load(open(os.path.join(out, "meta.json")))
  assert meta["kind"] == "imagenet_codes" and meta["codes_per_image"] == 16
  assert meta["classes"] == ["n01", "n02", "n03"] and meta["seq_len"] == SEQ
  assert meta["train"]["images"] == 9 and meta["train"]["records"] == 18  # + mirrored copies
  assert meta["validation"]["records"] == 4 and not meta["validation"]["hflip_copies"]
  train = list(imagenet.iter_records(os.path.join(out, "train.array_record")))
  val = list(imagenet.iter_records(os.path.join(out, "validation.array_record")))
  files = [root / "train" / c / f"img_{i}.png" for c in ("n01", "n02", "n03") for i in range(3)]
  images = np.stack([imagenet.load_image(str(f), SIZE) for f in files])
  codes = _encode(vq, images)
  flipped = _encode(vq, np.ascontiguousarray(images[:, :, ::-1]))
  # Batches of 4: each batch's originals, then the same batch mirrored.
  order = []
  for start in range(0, 9, 4):
    idx = list(range(start, min(start + 4, 9)))
    order += [(i, False) for i in idx] + [(i, True) for i in idx]
  for rec, (i, flip) in zip(train, order):
    np.testing.assert_array_equal(rec["codes"], (flipped if flip else codes)[i])
    assert rec["label"] == i // 3 and rec["codes"].dtype == np.int32
  assert [int(r["label"]) for r in val] == [0, 0, 2, 2]  # val labels use the train classes


def _data_config(out, seq_len=SEQ):
  import ml_collections
  return ml_collections.ConfigDict(dict(name="imagenet_codes", data_dir=out, seq_len=seq_len))


def test_train_iterator_batches_shards_and_resumes(built):
  _, out, _ = built
  cfg = _data_config(out)
  it = pipeline.build_train_iterator(cfg, None, seed=3, batch_size=4)
  first = next(it)
  assert first["tokens"].shape == (4, SEQ) and first["tokens"].dtype == np.int32
  assert (first["tokens"][:, 0] == imagenet.BOS_ID).all()
  assert (first["tokens"][:, 1:] < imagenet.CODEBOOK_SIZE).all()
  assert first["labels"].shape == (4,) and first["labels"].dtype == np.int32
  assert first["valid"].all()
  state = it.get_state()
  want = [next(it) for _ in range(3)]
  resumed = pipeline.build_train_iterator(cfg, None, seed=3, batch_size=4)
  resumed.set_state(json.loads(json.dumps(state)))
  for a in want:
    b = next(resumed)
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    np.testing.assert_array_equal(a["labels"], b["labels"])
  # Two hosts: disjoint halves of the records, each with half the global batch.
  seen = []
  for p in range(2):
    host = pipeline.build_train_iterator(cfg, None, seed=3, batch_size=4, process_index=p,
                                         process_count=2)
    rows = np.concatenate([next(host)["tokens"] for _ in range(5)])
    assert rows.shape[1] == SEQ
    seen.append({r.tobytes() for r in rows})
  assert not seen[0] & seen[1]


def test_eval_iterator_pads_with_invalid_rows(built):
  _, out, _ = built
  batches = list(pipeline.build_eval_iterator(_data_config(out), None, batch_size=3))
  tokens = np.concatenate([b["tokens"] for b in batches])
  valid = np.concatenate([b["valid"] for b in batches])
  labels = np.concatenate([b["labels"] for b in batches])
  assert tokens.shape == (6, SEQ) and valid[:, 0].sum() == 4
  assert (labels[~valid[:, 0]] == imagenet.NULL_CLASS).all()
  assert sorted(labels[valid[:, 0]].tolist()) == [0, 0, 2, 2]


def test_tfds_source(built, tmp_path, monkeypatch):
  tfds = pytest.importorskip("tensorflow_datasets")
  _, _, vq = built
  rng = np.random.default_rng(5)
  fake = {s: [{"image": rng.integers(0, 256, (12, 10, 3), np.uint8), "label": i % 2}
              for i in range(n)] for s, n in (("train", 5), ("validation", 2))}
  calls = []

  def data_source(name, split, data_dir):
    calls.append((name, split, data_dir))
    return fake[split]

  monkeypatch.setattr(tfds, "data_source", data_source)
  meta = imagenet_codes.preprocess_images("tfds:imagenet2012", str(tmp_path / "out"), "unused",
                                    data_dir="/tfds", image_size=SIZE, batch_size=4,
                                    num_workers=1, vq=vq)
  assert calls == [("imagenet2012", "train", "/tfds"), ("imagenet2012", "validation", "/tfds")]
  assert meta["train"]["records"] == 5 and meta["validation"]["records"] == 2
  recs = list(imagenet.iter_records(str(tmp_path / "out" / "validation.array_record")))
  want = _encode(vq, np.stack([imagenet.load_image(r["image"], SIZE) for r in fake["validation"]]))
  for rec, w, src in zip(recs, want, fake["validation"]):
    np.testing.assert_array_equal(rec["codes"], w)
    assert rec["label"] == src["label"]


def test_errors_name_the_flag_or_key(built, tmp_path):
  root, out, vq = built
  with pytest.raises(ValueError, match="config.data.seq_len: 1025.*16 codes"):
    pipeline.build_source(_data_config(out, 1025), None, "train")
  with pytest.raises(ValueError, match="--val_source: needed"):
    imagenet_codes.preprocess_images(f"imagefolder:{root}/train", str(tmp_path / "o"), "", vq=vq)
  _write_folder(tmp_path / "val2", ["n09"], 1, 2)
  with pytest.raises(ValueError, match=r"--val_source: class folders \['n09'\]"):
    imagenet_codes.preprocess_images(f"imagefolder:{root}/train", str(tmp_path / "o"), "", vq=vq,
                               val_source=f"imagefolder:{tmp_path}/val2", image_size=SIZE)
  with pytest.raises(ValueError, match="--source: expected imagefolder"):
    imagenet_codes.preprocess_images("jsonl:/x", str(tmp_path / "o"), "", vq=vq)
  os.makedirs(tmp_path / "text")
  (tmp_path / "text" / "meta.json").write_text(json.dumps({"seq_len": 17}))
  with pytest.raises(ValueError, match="is not ImageNet codes"):
    pipeline.build_source(_data_config(str(tmp_path / "text")), None, "train")
  with pytest.raises(SystemExit):
    preprocess_lib.main(["--source=imagefolder:/nope", "--tokenizer=vq_ds8", f"--out={tmp_path}"])


# ----------------------------------------------------------------------------------------------
# configs/imagenet.py end to end, at toy size: train on the records above, --mode=sample (PNG
# decoded by a VQ), --mode=eval (FID and IS with Inception weights made here).
# ----------------------------------------------------------------------------------------------

def _random_inception_npz(path):
  """FID Inception weights at random (He-scaled kernels, identity batch norm), so that the
  pool features stay finite through the 94 layers; written in `convert_inception`'s format."""
  from pgm_jax.models import inception  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)

  def leaf(path_keys, a):
    name = path_keys[-1].key
    if name == "kernel":
      fan_in = int(np.prod(a.shape[:-1]))
      return rng.normal(0.0, np.sqrt(2.0 / fan_in), a.shape).astype(np.float32)
    return (np.ones if name in ("scale", "var") else np.zeros)(a.shape, np.float32)

  inception.save_npz(jax.tree_util.tree_map_with_path(leaf, inception.abstract_params()), path)
  return path


def _tiny_imagenet_config(out, workdir_files):
  from conftest import load_config  # pylint: disable=g-import-not-at-top
  config = load_config("imagenet", "pgm_12_12")
  config.data.data_dir = out
  config.data.grid = SIZE // 2
  config.data.seq_len = SEQ
  config.data.tokenizer_path = workdir_files["vq"]
  config.model.update(dict(num_classes=3, hidden=32, num_heads=2, enc_layers=1, dec_layers=1,
                           dtype="float32", dropout=0.0))
  config.train.update(dict(batch_size=4, num_steps=2, log_every=1, eval_every=2,
                           num_final_samples=0))
  config.opt.warmup_steps = 1
  config.eval.update(dict(batch_size=4, max_batches=1, samples_per_class=4,
                          fid_weights=workdir_files["inception"],
                          fid_ref_stats=workdir_files["ref"]))
  config.ckpt.every_steps = 2
  config.sample.update(dict(steps=3, batch_size=6, classes=(0, 2), samples_per_class=3))
  return config


@pytest.mark.slow
def test_imagenet_config_trains_samples_and_scores_fid(built, tmp_path):
  from pgm_jax import train  # pylint: disable=g-import-not-at-top
  from pgm_jax.evaluation import evaluate  # pylint: disable=g-import-not-at-top
  from pgm_jax import sample as generate  # pylint: disable=g-import-not-at-top
  root, out, _ = built
  # The decoding VQ has the sampler's codebook (16384 codes): the records' 64-code VQ could
  # not decode every code the model may draw.
  cfg16k = dataclasses.replace(TINY, codebook_size=imagenet.CODEBOOK_SIZE)
  rng = np.random.default_rng(1)
  vq_params = jax.tree.map(lambda a: rng.normal(0, 0.3, a.shape).astype(np.float32),
                           vq_lib.abstract_params(cfg16k))
  files = {"vq": str(tmp_path / "vq16k.npz"), "inception": str(tmp_path / "inception.npz"),
           "ref": str(root / "val")}  # reference statistics computed from a folder
  vq_lib.save_npz(vq_params, files["vq"], cfg16k)
  _random_inception_npz(files["inception"])
  config = _tiny_imagenet_config(out, files)
  workdir = str(tmp_path / "run")

  history = train.train_and_evaluate(config, workdir)
  assert history["step"] == 2 and np.isfinite(history["train/loss"])

  info = generate.sample(config, workdir)
  png = np.asarray(Image.open(info["png"]))
  assert png.shape[2] == 3 and png.shape[0] > png.shape[1] / 3 * 2 - 8  # 2 rows x 3 columns
  saved = np.load(info["npz"])
  assert saved["codes"].shape == (6, SIZE // 2, SIZE // 2)
  np.testing.assert_array_equal(saved["labels"], [0, 0, 0, 2, 2, 2])

  result = evaluate(config, workdir)
  stored = json.load(open(os.path.join(workdir, "eval.json")))
  for key in ("fid", "inception_score", "steps", "sampler", "cfg_w", "images_per_s"):
    assert key in stored and stored[key] == result[key], key
  assert stored["num_samples"] == 12 and stored["sampler"] == "halton"
  assert np.isfinite(stored["fid"]) and stored["fid"] > 0
  assert stored["inception_score"] >= 1.0 - 1e-6 and stored["images_per_s"] > 0

  # A VQ whose codebook is not config.data.num_codes cannot decode the samples: one clear error.
  small = str(tmp_path / "vq64.npz")
  vq_lib.save_npz(jax.tree.map(lambda a: np.zeros(a.shape, np.float32),
                               vq_lib.abstract_params(TINY)), small, TINY)
  config.data.tokenizer_path = small
  with pytest.raises(ValueError, match="config.data.tokenizer_path"):
    generate.sample(config, workdir)
