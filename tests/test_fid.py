"""FID / IS (pgm_jax.evaluation.fid, .inception) against independent computations.

* The Flax FID Inception-v3 against `TorchFIDInception` below: a PyTorch forward written
  here from torch-fidelity's "inception-v3-compat" (the network the reference scores
  with; pytorch-fid's FID blocks are the same), with the same state-dict names, on random
  weights that go through our converter.
* The resize against PIL itself (Image.resize, BICUBIC, float mode: clean-fid's resizer).
* frechet_distance against closed forms; inception_score against a direct formula.
One jitted Inception program ([2, 32, 32, 3] uint8 in) serves every test of the module.
"""
import numpy as np
import pytest
from PIL import Image

import jax.numpy as jnp

from pgm_jax.evaluation import fid
from pgm_jax.models import inception

torch = pytest.importorskip("torch")
nn, F = torch.nn, torch.nn.functional


class Conv(nn.Module):
  def __init__(self, cin, cout, k, s=1, p=0):
    super().__init__()
    self.conv = nn.Conv2d(cin, cout, k, s, p, bias=False)
    self.bn = nn.BatchNorm2d(cout, eps=0.001)

  def forward(self, x):
    return F.relu(self.bn(self.conv(x)))


def _avg(x):
  return F.avg_pool2d(x, 3, 1, 1, count_include_pad=False)


class A(nn.Module):
  def __init__(self, cin, pf):
    super().__init__()
    self.branch1x1 = Conv(cin, 64, 1)
    self.branch5x5_1, self.branch5x5_2 = Conv(cin, 48, 1), Conv(48, 64, 5, p=2)
    self.branch3x3dbl_1 = Conv(cin, 64, 1)
    self.branch3x3dbl_2, self.branch3x3dbl_3 = Conv(64, 96, 3, p=1), Conv(96, 96, 3, p=1)
    self.branch_pool = Conv(cin, pf, 1)

  def forward(self, x):
    return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                      self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                      self.branch_pool(_avg(x))], 1)


class B(nn.Module):
  def __init__(self, cin):
    super().__init__()
    self.branch3x3 = Conv(cin, 384, 3, s=2)
    self.branch3x3dbl_1, self.branch3x3dbl_2 = Conv(cin, 64, 1), Conv(64, 96, 3, p=1)
    self.branch3x3dbl_3 = Conv(96, 96, 3, s=2)

  def forward(self, x):
    return torch.cat([self.branch3x3(x),
                      self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                      F.max_pool2d(x, 3, 2)], 1)


class C(nn.Module):
  def __init__(self, cin, c7):
    super().__init__()
    self.branch1x1 = Conv(cin, 192, 1)
    self.branch7x7_1, self.branch7x7_2 = Conv(cin, c7, 1), Conv(c7, c7, (1, 7), p=(0, 3))
    self.branch7x7_3 = Conv(c7, 192, (7, 1), p=(3, 0))
    self.branch7x7dbl_1 = Conv(cin, c7, 1)
    self.branch7x7dbl_2 = Conv(c7, c7, (7, 1), p=(3, 0))
    self.branch7x7dbl_3 = Conv(c7, c7, (1, 7), p=(0, 3))
    self.branch7x7dbl_4 = Conv(c7, c7, (7, 1), p=(3, 0))
    self.branch7x7dbl_5 = Conv(c7, 192, (1, 7), p=(0, 3))
    self.branch_pool = Conv(cin, 192, 1)

  def forward(self, x):
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    bd = self.branch7x7dbl_1(x)
    for m in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
      bd = m(bd)
    return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(_avg(x))], 1)


class D(nn.Module):
  def __init__(self, cin):
    super().__init__()
    self.branch3x3_1, self.branch3x3_2 = Conv(cin, 192, 1), Conv(192, 320, 3, s=2)
    self.branch7x7x3_1 = Conv(cin, 192, 1)
    self.branch7x7x3_2 = Conv(192, 192, (1, 7), p=(0, 3))
    self.branch7x7x3_3 = Conv(192, 192, (7, 1), p=(3, 0))
    self.branch7x7x3_4 = Conv(192, 192, 3, s=2)

  def forward(self, x):
    b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
    return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, 2)], 1)


class E(nn.Module):
  def __init__(self, cin, use_max):
    super().__init__()
    self.use_max = use_max
    self.branch1x1 = Conv(cin, 320, 1)
    self.branch3x3_1 = Conv(cin, 384, 1)
    self.branch3x3_2a, self.branch3x3_2b = Conv(384, 384, (1, 3), p=(0, 1)), Conv(384, 384, (3, 1), p=(1, 0))
    self.branch3x3dbl_1, self.branch3x3dbl_2 = Conv(cin, 448, 1), Conv(448, 384, 3, p=1)
    self.branch3x3dbl_3a = Conv(384, 384, (1, 3), p=(0, 1))
    self.branch3x3dbl_3b = Conv(384, 384, (3, 1), p=(1, 0))
    self.branch_pool = Conv(cin, 192, 1)

  def forward(self, x):
    b3 = self.branch3x3_1(x)
    bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    pool = F.max_pool2d(x, 3, 1, 1) if self.use_max else _avg(x)
    return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                      self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd), self.branch_pool(pool)], 1)


class TorchFIDInception(nn.Module):
  def __init__(self):
    super().__init__()
    self.Conv2d_1a_3x3, self.Conv2d_2a_3x3 = Conv(3, 32, 3, s=2), Conv(32, 32, 3)
    self.Conv2d_2b_3x3 = Conv(32, 64, 3, p=1)
    self.Conv2d_3b_1x1, self.Conv2d_4a_3x3 = Conv(64, 80, 1), Conv(80, 192, 3)
    self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = A(192, 32), A(256, 64), A(288, 64)
    self.Mixed_6a = B(288)
    self.Mixed_6b, self.Mixed_6c = C(768, 128), C(768, 160)
    self.Mixed_6d, self.Mixed_6e = C(768, 160), C(768, 192)
    self.Mixed_7a, self.Mixed_7b, self.Mixed_7c = D(768), E(1280, False), E(2048, True)
    self.fc = nn.Linear(2048, 1008)

  def forward(self, x):  # x: normalised, NCHW
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(F.max_pool2d(x, 3, 2)))
    x = F.max_pool2d(x, 3, 2)
    for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
      x = getattr(self, f"Mixed_{name}")(x)
    pool = x.mean(dim=(2, 3))
    return pool, pool @ self.fc.weight.T


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
  torch.manual_seed(0)
  model = TorchFIDInception().eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("conv.weight"):  # He init keeps activations O(1) through 94 layers
        p.copy_(torch.randn(p.shape) * np.sqrt(2.0 / p[0].numel()))
      elif name.endswith("bn.weight"):
        p.uniform_(0.8, 1.2)
      else:
        p.normal_(0.0, 0.1)
    for name, b in model.named_buffers():
      if name.endswith("running_mean"):
        b.normal_(0.0, 0.1)
      elif name.endswith("running_var"):
        b.uniform_(0.5, 1.5)
  state_dict = {k: v.clone() for k, v in model.state_dict().items()}
  pth = str(tmp_path_factory.mktemp("inc") / "pt_inception-random.pth")
  torch.save(state_dict, pth)
  npz = pth.replace(".pth", ".npz")
  from pgm_jax.tools import eval_assets as cli
  cli.main(["convert_inception", f"--from={pth}", f"--to={npz}"])
  extractor = inception.InceptionExtractor.from_file(npz)
  return model, extractor, npz


def _images(seed, n=4, size=32):
  return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


@pytest.mark.slow
def test_network_matches_torch_fidelity_architecture(nets):
  model, extractor, _ = nets
  images = _images(0, 2)
  pool, logits = fid.extract_features(images, extractor, batch_size=2)
  x = np.asarray(inception.preprocess(images))          # our resize; the network is under test
  with torch.no_grad():
    ref_pool, ref_logits = model(torch.from_numpy(x.copy()).permute(0, 3, 1, 2))
  err_pool = float(np.abs(np.asarray(pool) - ref_pool.numpy()).max())
  err_logits = float(np.abs(np.asarray(logits) - ref_logits.numpy()).max())
  print(f"Inception converter check: pool max abs err {err_pool:.2e} (scale "
        f"{float(ref_pool.abs().max()):.2f}), logits_unbiased max abs err {err_logits:.2e} "
        f"(scale {float(ref_logits.abs().max()):.2f})")
  assert pool.shape == (2, 2048) and logits.shape == (2, 1008)
  assert err_pool < 1e-4 * float(ref_pool.abs().max())
  assert err_logits < 1e-4 * float(ref_logits.abs().max())


def _pil_resize(x, size):
  """clean-fid's "clean" resize: PIL BICUBIC on each channel as a float ("F") image."""
  return np.stack([np.asarray(Image.fromarray(x[:, :, c].astype(np.float32), mode="F")
                              .resize((size, size), Image.BICUBIC)) for c in range(x.shape[-1])], -1)


@pytest.mark.parametrize("h,w,size", [(32, 32, 299), (23, 40, 17)])
def test_resize_matches_pil(h, w, size):
  x = np.random.default_rng(1).uniform(0, 255, size=(h, w, 3)).astype(np.float32)
  ours = np.asarray(inception.resize_bicubic(jnp.asarray(x[None]), size))[0]
  ref = _pil_resize(x, size)
  assert ours.shape == ref.shape == (size, size, 3)
  np.testing.assert_allclose(ours, ref, atol=2e-3)


def test_preprocess_cast_clip_and_wrap():
  # 299x299 input skips the resize: only the uint8 cast and (x - 128) / 128 remain.
  x = np.zeros([1, 299, 299, 3], np.float32)
  x[0, 0, 0] = [-1.2, 1.3, 0.0]                # (x + 1) * 127.5 -> -25.5 (clipped), 293.25, 127.5
  out = np.asarray(inception.preprocess(x)) * 128 + 128
  np.testing.assert_allclose(out[0, 0, 0], [0, 255, 127])
  u8 = np.full([1, 299, 299, 3], 200, np.uint8)
  np.testing.assert_allclose(np.asarray(inception.preprocess(u8)), (200 - 128) / 128)
  # The reference's cast of overshoot values: trunc, then modulo 256 (torch on CPU).
  big = jnp.asarray([[[[-1.5, 256.7, 300.2]]]], jnp.float32)
  wrapped = (jnp.mod(jnp.trunc(big), 256.0))
  np.testing.assert_array_equal(np.asarray(wrapped).ravel(),
                                torch.tensor([-1.5, 256.7, 300.2]).to(torch.uint8).numpy())
  with pytest.raises(ValueError, match="overflow"):
    inception.preprocess(u8, overflow="saturate")


def test_frechet_distance_closed_forms():
  rng = np.random.default_rng(2)
  d = 6
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  v1, v2 = rng.uniform(0.5, 2, d), rng.uniform(0.5, 2, d)
  want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
  assert fid.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(want, rel=1e-9)
  a, b = rng.normal(size=(d, 2 * d)), rng.normal(size=(d, 3 * d))
  s1, s2 = a @ a.T / (2 * d), b @ b.T / (3 * d)
  # tr sqrt(S1 S2) = sum of the square roots of the (real, positive) eigenvalues of S1 S2.
  want = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(
      np.sqrt(np.linalg.eigvals(s1 @ s2).real))
  assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-8)
  assert abs(fid.frechet_distance(mu1, s1, mu1, s1)) < 1e-9
  # pytorch-fid's route (scipy sqrtm of the product) gives the same number.
  import scipy.linalg
  covmean = scipy.linalg.sqrtm(s1 @ s2).real
  pfid = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
  assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(pfid, rel=1e-8)
  # Fewer samples than dimensions: the N-dimensional route equals the D-dimensional one.
  for n in (4, 9):
    x = rng.normal(size=(n, d)) + 0.5
    st = fid.stats_from_features(x)
    assert fid.frechet_distance_of_features(x, mu2, s2) == pytest.approx(
        fid.frechet_distance(st["mu"], st["sigma"], mu2, s2), rel=1e-6)
  with pytest.raises(ValueError, match="shapes differ"):
    fid.frechet_distance(mu1, s1, mu2[:3], s2)


def test_inception_score():
  n, k = 100, 1008
  assert fid.inception_score(np.zeros([n, k])) == pytest.approx(1.0)
  # Confident, evenly spread predictions: IS = number of classes seen in each split.
  logits = np.full([n, k], -50.0)
  logits[np.arange(n), np.arange(n) % 5] = 50.0
  assert fid.inception_score(logits, splits=10, shuffle_seed=None) == pytest.approx(5.0, rel=1e-6)
  # Class-sorted samples: consecutive chunks see one class each (IS 1); the default
  # seeded shuffle restores the score of a mixed order.
  logits = np.full([n, k], -50.0)
  logits[np.arange(n), np.arange(n) // 10] = 50.0
  assert fid.inception_score(logits, splits=10, shuffle_seed=None) == pytest.approx(1.0)
  assert fid.inception_score(logits, splits=10) > 4.0
  rng = np.random.default_rng(3)
  logits = rng.normal(size=(50, 20)) * 3
  p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  want = np.mean([np.exp(np.mean(np.sum(q * (np.log(q) - np.log(q.mean(0))), 1)))
                  for q in np.split(p, 5)])
  assert fid.inception_score(logits, splits=5, shuffle_seed=None) == pytest.approx(want, rel=1e-9)
  with pytest.raises(ValueError, match="splits"):
    fid.inception_score(logits[:3], splits=10)


@pytest.mark.slow
def test_fid_and_is_against_folder_statistics(nets, tmp_path):
  _, extractor, npz = nets
  images = _images(4, 4)
  folder = tmp_path / "ref" / "class_a"
  folder.mkdir(parents=True)
  for i, im in enumerate(images):
    Image.fromarray(im).save(folder / f"{i}.png")
  ref = fid.ref_stats_from_folder(str(tmp_path / "ref"), npz, image_size=None, batch_size=2,
                                  extractor=extractor)
  stats_path = str(tmp_path / "ref_stats.npz")
  fid.save_ref_stats(stats_path, ref, source="test")
  loaded = fid.load_ref_stats(stats_path)
  assert loaded["num_images"] == 4
  np.testing.assert_allclose(loaded["mu"], ref["mu"])
  same = fid.fid_and_is(images, stats_path, npz, batch_size=2, splits=2, extractor=extractor)
  assert same["num_images"] == 4 and same["ref_num_images"] == 4
  trace = float(np.trace(ref["sigma"]))
  assert abs(same["fid"]) < 1e-6 * trace, (same["fid"], trace)
  assert same["inception_score"] >= 1.0 - 1e-9
  # Other images, given as an iterable of batches: a positive distance, equal to the closed
  # form for two low-rank Gaussians: tr (S1 S2)^(1/2) = nuclear norm of X1c X2c^T / sqrt((n1-1)(n2-1)).
  other_images = _images(6, 2)
  other = fid.fid_and_is(iter([other_images]), loaded, npz, batch_size=2, splits=2,
                         extractor=extractor)
  assert other["fid"] > 0.05 * trace
  x1 = fid.extract_features(images, extractor, batch_size=2)[0]
  x2 = fid.extract_features(other_images, extractor, batch_size=2)[0]
  c1, c2 = x1 - x1.mean(0), x2 - x2.mean(0)
  nuclear = np.linalg.svd(c1 @ c2.T, compute_uv=False).sum() / np.sqrt(3 * 1)
  want = (np.sum((x1.mean(0) - x2.mean(0)) ** 2) + np.sum(c1 * c1) / 3 + np.sum(c2 * c2) / 1
          - 2 * nuclear)
  assert other["fid"] == pytest.approx(want, rel=1e-6)
  with pytest.raises(ValueError, match="does not exist"):
    fid.load_ref_stats(str(tmp_path / "missing.npz"))
  with pytest.raises(ValueError, match="pt_inception"):
    inception.load_params(str(tmp_path / "missing.pth"))
