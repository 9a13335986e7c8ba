"""The Flax VQ-8 tokenizer (pgm_jax.models.vq) against an independent PyTorch forward.

`TorchVQ` below is written here, in PyTorch and NCHW, from LlamaGen's published VQ model
(tokenizer/tokenizer_image/vq_model.py: module names, GroupNorm(32, 1e-6), swish, the
(0,1)-padded stride-2 downsample, nearest x2 upsample, L2-normalised codebook). Its
random state dict goes through the converter; codes must match exactly and latents /
decoded images to float32 round-off. The model is VQ-8 at reduced width (ch 32,
z 32, codebook 512) on 32x32 images, so the test costs seconds; the full-size
parameter count is pinned against the same PyTorch model at LlamaGen's sizes.
"""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from pgm_jax.models import vq
from pgm_jax.tools import vq as vq_tool

torch = pytest.importorskip("torch")
nn, F = torch.nn, torch.nn.functional

SMALL = vq.VQConfig(codebook_size=512, codebook_dim=8, ch=32, ch_mult=(1, 2, 2, 4),
                    num_res_blocks=2, z_channels=32)


def _norm(c):
  return nn.GroupNorm(32, c, eps=1e-6, affine=True)


class TRes(nn.Module):
  def __init__(self, cin, cout):
    super().__init__()
    self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, 1, 1)
    self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, 1, 1)
    if cin != cout:
      self.nin_shortcut = nn.Conv2d(cin, cout, 1)

  def forward(self, x):
    h = self.conv1(F.silu(self.norm1(x)))
    h = self.conv2(F.silu(self.norm2(h)))
    return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class TAttn(nn.Module):
  def __init__(self, c):
    super().__init__()
    self.norm = _norm(c)
    self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

  def forward(self, x):
    b, c, h, w = x.shape
    y = self.norm(x)
    q = self.q(y).reshape(b, c, h * w).permute(0, 2, 1)
    k = self.k(y).reshape(b, c, h * w)
    a = torch.softmax(torch.bmm(q, k) * c ** -0.5, dim=2)
    out = torch.bmm(self.v(y).reshape(b, c, h * w), a.permute(0, 2, 1)).reshape(b, c, h, w)
    return x + self.proj_out(out)


class TDown(nn.Module):
  def __init__(self, c):
    super().__init__()
    self.conv = nn.Conv2d(c, c, 3, 2, 0)

  def forward(self, x):
    return self.conv(F.pad(x, (0, 1, 0, 1)))


class TUp(nn.Module):
  def __init__(self, c):
    super().__init__()
    self.conv = nn.Conv2d(c, c, 3, 1, 1)

  def forward(self, x):
    return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class TEncoder(nn.Module):
  def __init__(self, ch, mult, nres, z):
    super().__init__()
    self.conv_in = nn.Conv2d(3, ch, 3, 1, 1)
    self.conv_blocks = nn.ModuleList()
    cin = ch
    for i, m in enumerate(mult):
      blk = nn.Module()
      blk.res, blk.attn = nn.ModuleList(), nn.ModuleList()
      for _ in range(nres):
        blk.res.append(TRes(cin, ch * m))
        cin = ch * m
        if i == len(mult) - 1:
          blk.attn.append(TAttn(cin))
      if i != len(mult) - 1:
        blk.downsample = TDown(cin)
      self.conv_blocks.append(blk)
    self.mid = nn.ModuleList([TRes(cin, cin), TAttn(cin), TRes(cin, cin)])
    self.norm_out, self.conv_out = _norm(cin), nn.Conv2d(cin, z, 3, 1, 1)

  def forward(self, x):
    h = self.conv_in(x)
    for blk in self.conv_blocks:
      for j, res in enumerate(blk.res):
        h = res(h)
        if len(blk.attn):
          h = blk.attn[j](h)
      if hasattr(blk, "downsample"):
        h = blk.downsample(h)
    for m in self.mid:
      h = m(h)
    return self.conv_out(F.silu(self.norm_out(h)))


class TDecoder(nn.Module):
  def __init__(self, ch, mult, nres, z):
    super().__init__()
    cin = ch * mult[-1]
    self.conv_in = nn.Conv2d(z, cin, 3, 1, 1)
    self.mid = nn.ModuleList([TRes(cin, cin), TAttn(cin), TRes(cin, cin)])
    self.conv_blocks = nn.ModuleList()
    for level in reversed(range(len(mult))):
      blk = nn.Module()
      blk.res, blk.attn = nn.ModuleList(), nn.ModuleList()
      for _ in range(nres + 1):
        blk.res.append(TRes(cin, ch * mult[level]))
        cin = ch * mult[level]
        if level == len(mult) - 1:
          blk.attn.append(TAttn(cin))
      if level != 0:
        blk.upsample = TUp(cin)
      self.conv_blocks.append(blk)
    self.norm_out, self.conv_out = _norm(cin), nn.Conv2d(cin, 3, 3, 1, 1)

  def forward(self, z):
    h = self.conv_in(z)
    for m in self.mid:
      h = m(h)
    for blk in self.conv_blocks:
      for j, res in enumerate(blk.res):
        h = res(h)
        if len(blk.attn):
          h = blk.attn[j](h)
      if hasattr(blk, "upsample"):
        h = blk.upsample(h)
    return self.conv_out(F.silu(self.norm_out(h)))


class TQuant(nn.Module):
  def __init__(self, n, d):
    super().__init__()
    self.embedding = nn.Embedding(n, d)
    self.register_buffer("codebook_used", torch.zeros(65536))


class TorchVQ(nn.Module):
  def __init__(self, cfg: vq.VQConfig):
    super().__init__()
    args = (cfg.ch, cfg.ch_mult, cfg.num_res_blocks, cfg.z_channels)
    self.encoder, self.decoder = TEncoder(*args), TDecoder(*args)
    self.quantize = TQuant(cfg.codebook_size, cfg.codebook_dim)
    self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.codebook_dim, 1)
    self.post_quant_conv = nn.Conv2d(cfg.codebook_dim, cfg.z_channels, 1)

  def latents(self, x):
    return self.quant_conv(self.encoder(x))

  def encode(self, x):
    z = self.latents(x).permute(0, 2, 3, 1)
    zf = F.normalize(z.reshape(-1, z.shape[-1]), dim=-1)
    e = F.normalize(self.quantize.embedding.weight, dim=-1)
    d = (zf ** 2).sum(1, keepdim=True) + (e ** 2).sum(1) - 2 * zf @ e.t()
    return d.argmin(1).reshape(z.shape[:3]), d

  def decode(self, codes):
    e = F.normalize(self.quantize.embedding.weight, dim=-1)
    return self.decoder(self.post_quant_conv(e[codes].permute(0, 3, 1, 2)))


def _randomize(model, seed):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if ".norm" in name and name.endswith("weight"):  # GroupNorm scales
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
      elif p.ndim == 4:
        p.copy_(torch.randn(p.shape, generator=g) * (1.0 / np.sqrt(p[0].numel())))
      else:
        p.copy_(0.1 * torch.randn(p.shape, generator=g))
  return model


@pytest.fixture(scope="module")
def small():
  torch.manual_seed(0)
  model = _randomize(TorchVQ(SMALL).eval(), 0)
  state_dict = {k: v.clone() for k, v in model.state_dict().items()}
  params = vq.params_from_state_dict(state_dict, SMALL)
  return model, state_dict, vq.VQTokenizer(jax.tree.map(jnp.asarray, params), SMALL)


@pytest.mark.slow
def test_matches_torch_forward(small):
  model, _, tok = small
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
  x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
  with torch.no_grad():
    ref_lat = model.latents(x).permute(0, 2, 3, 1).numpy()
    ref_codes, d = model.encode(x)
    top2 = torch.topk(-d, 2, dim=1).values
  # The nearest code must be well separated for an exact comparison to be meaningful.
  assert float((top2[:, 0] - top2[:, 1]).min()) > 1e-5
  codes, lat = tok.encode_with_latents(images)
  codes = np.asarray(codes)
  err_lat = float(np.abs(np.asarray(lat) - ref_lat).max())
  assert err_lat < 1e-4 * max(1.0, float(np.abs(ref_lat).max())), err_lat
  assert codes.shape == (3, 4, 4) and codes.dtype == np.int32
  np.testing.assert_array_equal(codes, ref_codes.numpy())
  with torch.no_grad():
    ref_img = model.decode(torch.from_numpy(codes.copy()).long()).permute(0, 2, 3, 1).numpy()
  img = np.asarray(tok.decode(codes))
  assert img.shape == (3, 32, 32, 3)
  err_img = float(np.abs(img - ref_img).max())
  print(f"VQ converter check: latents max abs err {err_lat:.2e}, decoded images max abs err "
        f"{err_img:.2e} (image scale {np.abs(ref_img).max():.2f})")
  assert err_img < 1e-4 * max(1.0, float(np.abs(ref_img).max())), err_img


@pytest.mark.slow
def test_chunked_code_search_equals_one_block(small):
  _, _, tok = small
  z = jax.random.normal(jax.random.key(1), (1000, 8))
  e = vq.l2_normalize(tok.params["quantize"]["embedding"]["embedding"])
  np.testing.assert_array_equal(np.asarray(vq.nearest_code(z, e, 4096)),
                                np.asarray(vq.nearest_code(z, e, 96)))


def test_full_size_parameter_count_matches_llamagen_vq8():
  with torch.device("meta"):
    torch_count = sum(p.numel() for p in TorchVQ(vq.VQConfig()).parameters())
  flax_count = vq.num_params(vq.abstract_params(vq.VQConfig()))
  assert flax_count == torch_count == 70_109_835


@pytest.mark.slow
def test_npz_and_pt_files_load_the_same(small, tmp_path):
  model, state_dict, tok = small
  pt = str(tmp_path / "vq_small.pt")
  torch.save({"model": state_dict, "steps": 7}, pt)
  npz = str(tmp_path / "vq_small.npz")
  params, cfg = vq.load_params(pt, SMALL)
  vq.save_npz(params, npz, cfg)
  loaded, cfg2 = vq.load_params(npz)  # config read from the .npz
  assert cfg2 == SMALL
  flat = lambda t: {"/".join(p): np.asarray(v) for p, v in vq._paths(t)}
  want, got = flat(tok.params), flat(loaded)
  assert sorted(want) == sorted(got)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


@pytest.mark.slow
def test_converter_cli_and_errors(small, tmp_path, capsys):
  _, state_dict, _ = small
  pt = str(tmp_path / "vq.pt")
  bad = dict(state_dict)
  bad["quantize.embedding.weight"] = torch.zeros(100, 8)
  torch.save({"model": bad}, pt)
  with pytest.raises(ValueError, match=r"quantize.embedding.weight: shape \(100, 8\)"):
    vq.load_params(pt, SMALL)
  del bad["quantize.embedding.weight"]
  bad["extra.weight"] = torch.zeros(3)
  torch.save(bad, pt)
  with pytest.raises(ValueError, match=r"missing \['quantize.embedding.weight'\].*unexpected "
                                       r"\['extra.weight'\]"):
    vq.load_params(pt, SMALL)
  with pytest.raises(ValueError, match="does not exist"):
    vq.load_params(str(tmp_path / "nope.pt"))
  with pytest.raises(SystemExit) as e:
    vq_tool.main(["--from", pt, "--to", str(tmp_path / "out.npz")])  # full-size config: no fit
  err = capsys.readouterr().err.strip().splitlines()
  assert e.value.code == 1 and len(err) == 1 and err[0].startswith("pgm_jax.tools.vq: error: --from: ")
  assert err[0].count("pgm_jax.tools.vq") == 1                          # said once
  for bad in ("nope.pt", "wrong_kind.npz"):
    if bad.endswith(".npz"):
      np.savez(tmp_path / bad, codes=np.zeros(3))                          # an npz, not a VQ
    with pytest.raises(SystemExit) as e:
      vq_tool.main(["--from", str(tmp_path / bad), "--to", str(tmp_path / "out.npz")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) == 1, err
    assert ("does not exist" if bad == "nope.pt" else "is not a converted VQ-8 .npz") in err[0]


def test_uint8_round_trip_helpers():
  x = np.array([0, 1, 127, 128, 254, 255], np.uint8)
  np.testing.assert_array_equal(np.asarray(vq.images_to_uint8(vq.images_to_float(x))), x)
  with pytest.raises(ValueError, match="images: expected"):
    vq.images_to_float(np.zeros(3, np.int32))
