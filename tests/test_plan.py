"""--mode=plan: compiling with the real TPU compiler (libtpu) for named slices, on this CPU.

Tiny models only (configs/shakespeare.py:tiny: H 64, 1 + 1 PGM layers, L 32) on the
smallest slice, v5e-4 (v5e:2x2, one host, 4 chips): each TPU compile takes a few seconds.
The image samplers: configs/digits.py:tiny (PGM and MaskGIT, H 32, L 65) on the same
slice, and the VQ decoder branch on a tiny-grid ImageNet config with XLA:CPU. Every compile
happens once per module (module-scoped fixtures). The TPU tests are
skipped only when libtpu is not importable (`pip install -e '.[tpu]'`); the cpu-virtual
fallback is exercised with PGM_JAX_PLAN_NO_LIBTPU=1, through the command line.
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, load_config  # pylint: disable=g-bad-import-order
from pgm_jax.tools import plan

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not importable "
                                  "(pip install -e '.[tpu]')")
TOPOLOGY = "v5e-4"
V5E_HBM_GIB = 15.75  # what libtpu 0.0.42.1 budgets per v5e chip


def tiny_config(**plan_keys):
  cfg = load_config("shakespeare", "tiny")
  cfg.attn.impl = "auto"   # -> the Pallas (Mosaic) kernels inside compile_target("tpu")
  # The paper configs' memory levers, compiled with Mosaic as they run on a pod.
  cfg.attn.sorted_layout = True
  cfg.model.remat = "dots_with_no_batch_dims_saveable"
  cfg.model.loss_chunk_len = 16
  cfg.plan.topology = TOPOLOGY
  cfg.plan.update(plan_keys)
  return cfg


@pytest.fixture(scope="module")
def train_plan(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("plan_train"))
  result = plan.run_plan(tiny_config(), workdir)
  with open(os.path.join(workdir, "plan.json")) as f:
    return result, json.load(f)


@pytest.fixture(scope="module")
def oom_plan():
  cfg = tiny_config()
  cfg.train.batch_size = 2 ** 18  # one float32 logits chunk: 2^18 x 16 x 2049 x 4 B = 32 GiB
  return plan.plan(cfg)


@pytest.fixture(scope="module")
def sample_plan():
  cfg = tiny_config(what="sample")
  cfg.bench.update(dict(batch_size=4, seq_len=32, steps=4))
  return plan.plan(cfg)


IMAGE_BUCKET = 8  # several step programs in a 4-step run of 64 codes: plan picks the largest


@pytest.fixture(scope="module")
def image_sample_plans():
  """what=sample for the digits' tiny PGM and MaskGIT on one v5e chip (config.sample.cfg_w
  stays 0: guidance is planned anyway, config.plan.sample_guidance)."""
  out = {}
  for preset in ("pgm", "maskgit"):
    cfg = load_config("digits", f"tiny,{preset}")
    cfg.plan.update(dict(topology=TOPOLOGY, what="sample"))
    cfg.sample.bucket_size = IMAGE_BUCKET
    out[preset] = plan.plan(cfg)
  return out


# -- no compiler needed --------------------------------------------------------------------

def test_topology_table():
  assert plan.resolve_topology("v5e-32").topology == "v5e:4x8"
  assert plan.resolve_topology("v4-32").chips == 16          # v4-N counts TensorCores
  assert plan.resolve_topology("v5p-16").chips == 8          # so does v5p-N
  assert plan.resolve_topology("v6e-16").chips == 16         # v5e/v6e count chips
  assert plan.resolve_topology("v5e:4x4").name == "v5e-16"   # raw topology strings
  assert plan.resolve_topology("v4:2x2x2").name == "v4-16"
  with pytest.raises(ValueError, match="config.plan.topology"):
    plan.resolve_topology("v9-3")


def test_table_reports_how_the_mesh_was_built():
  base = {"what": "train", "compiler": "tpu", "topology": "v5e-16", "topology_string": "v5e:4x4",
          "chips": 16, "device_kind": "TPU v5 lite", "model": "pgm", "num_params": 1e6,
          "dtype": "bfloat16", "attn_impl": "pallas", "mesh": {"data": 8, "fsdp": 1, "tensor": 2},
          "num_devices": 16, "batch_size": 16, "seq_len": 32, "microbatch_size": 16,
          "per_device_microbatch": 2, "state_bytes_per_device": 0, "flops_per_device": 1.0,
          "mesh_method": "hybrid (per-slice topology-aware, slices over DCN)",
          "dcn_shape": [2, 1, 1], "ici_shape": [4, 1, 2],
          "mesh_device_order": [{"id": i, "coords": [i % 2, i // 2, 0], "slice": 0}
                                for i in range(8)]}
  row = [r for r in plan.format_table(base).splitlines() if r.startswith("mesh order")][0]
  assert "hybrid" in row and "dcn_shape (2, 1, 1) x ici (4, 1, 2)" in row, row
  assert "devices 0(0,0,0) 1(1,0,0) 2(0,1,0)" in row and row.endswith("..."), row


def test_parse_resource_exhausted():
  msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
         "temporaries (120.93G) exceeds available HBM (15.75G).")
  parsed = plan.parse_resource_exhausted(msg)
  assert parsed["what"] == "HLO temporaries"
  assert parsed["required_bytes"] == round(120.93 * 2 ** 30)
  assert parsed["available_bytes"] == round(15.75 * 2 ** 30)
  old = "RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Used 20.50G of 15.48G hbm."
  assert plan.parse_resource_exhausted(old)["required_bytes"] == round(20.5 * 2 ** 30)
  assert plan.parse_resource_exhausted("INTERNAL: something else") is None


def test_model_flops_counts_live_attention_pairs():
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from pgm_jax.models import ModelConfig  # pylint: disable=g-import-not-at-top
  h, L, B = 64, 32, 2
  params = {"blocks_0": {"attn_qkv": {"kernel": jnp.zeros((h, 3 * h))},
                         "adaLN_modulation": {"kernel": jnp.zeros((8, 6 * h))}},
            "vocab_embed": {"embedding": jnp.zeros((100, h))}}
  assert plan.matmul_params(params) == 3 * h * h
  pgm = ModelConfig(kind="pgm", vocab_size=100, mask_id=99, hidden=h, enc_layers=3,
                    dec_layers=2)
  f = plan.model_flops(pgm, params, B, L)
  # 3 encoder layers at 2/3 + GroupSwap and 2 decoder layers at 1/3 = 3 full layers.
  assert f["attention_flops"] == pytest.approx(12 * h * B * L ** 2 * 3)
  assert f["dense_flops"] == 6 * 3 * h * h * B * L


# -- the TPU compiler ----------------------------------------------------------------------

@needs_libtpu
@pytest.mark.slow
@pytest.mark.tpu_compile
def test_topology_devices_and_hbm():
  topo = plan.resolve_topology(TOPOLOGY)
  devices = plan.topology_devices(topo)
  assert len(devices) == 4 and devices[0].device_kind == "TPU v5 lite"
  nbytes, source = plan.device_memory_bytes(topo)
  assert source == "compiler" and nbytes == pytest.approx(V5E_HBM_GIB * 2 ** 30, rel=1e-3)
  assert len(plan.topology_devices(plan.resolve_topology("v4-16"))) == 8  # megacore


@needs_libtpu
@pytest.mark.slow
@pytest.mark.tpu_compile
def test_train_plan_on_tpu_compiles_the_mosaic_kernels(train_plan):
  result, on_disk = train_plan
  assert on_disk == json.loads(json.dumps(result))
  assert result["compiler"] == "tpu"
  assert result["topology"] == TOPOLOGY and result["topology_string"] == "v5e:2x2"
  assert result["device_kind"] == "TPU v5 lite"
  assert result["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
  # v5e:2x2 laid out by create_device_mesh: the data axis is a ring of ICI neighbours.
  assert result["mesh_method"] == "topology-aware" and result["dcn_shape"] is None
  order = result["mesh_device_order"]
  assert sorted(d["id"] for d in order) == [0, 1, 2, 3]
  assert all(sum(abs(x - y) for x, y in zip(a["coords"], b["coords"])) == 1
             for a, b in zip(order, order[1:]))
  assert result["attn_impl_config"] == "auto" and result["attn_impl"] == "pallas"
  assert result["mosaic_custom_calls"] > 0   # tpu_custom_call in the compiled HLO
  mem = result["memory_per_device"]
  for key in ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
              "temp_size_in_bytes", "peak_memory_in_bytes", "peak_estimate_bytes",
              "peak_bytes"):
    assert key in mem, key
  assert 0 < mem["peak_bytes"] < 2 ** 30
  assert result["device_memory_gib"] == pytest.approx(V5E_HBM_GIB, rel=1e-3)
  assert result["device_memory_source"] == "compiler"
  assert result["max_memory_fraction"] == 0.9
  assert result["fits"] is True
  assert result["compile_seconds"] > 0
  assert result["flops_per_device"] > 0
  assert result["model_flops_per_step"] > 0
  assert result["model_flops"]["attention_alive_fraction"] == {
      "same_group": pytest.approx(2 / 3), "other_group": pytest.approx(1 / 3)}
  assert "resource_exhausted" not in result
  table = plan.format_table(result)
  assert "fits" in table and "tpu" in table
  row = [r for r in table.splitlines() if r.startswith("mesh order")]
  assert row and "topology-aware; devices " in row[0], table


@needs_libtpu
@pytest.mark.slow
@pytest.mark.tpu_compile
def test_over_budget_is_fits_false_not_a_crash(oom_plan):
  assert oom_plan["compiler"] == "tpu"
  assert oom_plan["fits"] is False
  oom = oom_plan["resource_exhausted"]
  assert oom["available_bytes"] == pytest.approx(V5E_HBM_GIB * 2 ** 30, rel=1e-3)
  assert oom["required_bytes"] > oom["available_bytes"]
  assert "RESOURCE_EXHAUSTED" in oom["message"]
  assert "NO: RESOURCE_EXHAUSTED" in plan.format_table(oom_plan)


@needs_libtpu
@pytest.mark.slow
@pytest.mark.tpu_compile
def test_sample_plan_on_one_chip(sample_plan):
  assert sample_plan["what"] == "sample" and sample_plan["compiler"] == "tpu"
  assert sample_plan["setting"] == {"batch_size": 4, "seq_len": 32, "steps": 4,
                                    "vocab_size": sample_plan["setting"]["vocab_size"],
                                    "n_enc": 32, "n_query": 8}
  programs = sample_plan["programs"]
  assert set(programs) == {"pgm_efficient_step", "mdlm_ddpm_cache_run"}
  for prog in programs.values():
    assert prog["attn_impl"] == "pallas" and prog["mosaic_custom_calls"] > 0
    assert prog["memory_per_device"]["peak_bytes"] > 0
    assert prog["fits"] is True
  assert sample_plan["fits"] is True
  assert "pgm_efficient_step" in plan.format_table(sample_plan)


@needs_libtpu
@pytest.mark.slow
@pytest.mark.tpu_compile
@pytest.mark.parametrize("preset,name,execution", [
    ("pgm", "pgm_image_efficient_step", "efficient"), ("maskgit", "maskgit_full_step", "full")])
def test_image_sample_plan_on_one_chip(image_sample_plans, preset, name, execution):
  from pgm_jax.samplers import image as image_samplers  # pylint: disable=g-import-not-at-top
  result = image_sample_plans[preset]
  assert result["what"] == "sample" and result["compiler"] == "tpu"
  assert result["setting"] == {"batch_size": 20, "grid": 8, "seq_len": 65, "steps": 4,
                               "sampler": "halton", "bucket_size": IMAGE_BUCKET, "cfg": True,
                               "cfg_w": 0.0, "vocab_size": 19}
  assert set(result["programs"]) == {name}  # one step program; the digits have no VQ decoder
  prog = result["programs"][name]
  run = image_samplers.step_shapes("halton", 8, 4, execution=execution,
                                   bucket_size=IMAGE_BUCKET)
  assert prog["execution"] == execution and prog["programs_in_run"] == len(set(run))
  assert (prog["n_enc"], prog["n_query"]) == (max(e for e, _ in run), max(q for _, q in run))
  assert prog["model_batch"] == 40  # guidance: the batch doubled
  assert prog["memory_per_device"]["peak_bytes"] > 0 and prog["compile_seconds"] > 0
  assert prog["fits"] is True and result["fits"] is True
  table = plan.format_table(result)
  assert name in table and "x2 (guidance)" in table


@pytest.mark.slow
def test_image_sample_plan_includes_the_vq_decoder():
  """ImageNet (VQ codes) on a 4x4 grid, tiny model, XLA:CPU: the step program and the VQ
  decoder at the FID eval's sampling batch and at the --mode=sample grid."""
  cfg = load_config("imagenet", "pgm_12_12")
  cfg.model.update(dict(hidden=32, num_heads=2, enc_layers=1, dec_layers=1))
  cfg.data.update(dict(grid=4, seq_len=17))
  cfg.sample.update(dict(batch_size=2, steps=4, classes=(1, 2, 3), samples_per_class=1))
  cfg.plan.update(dict(what="sample", compiler="cpu-virtual", device_memory_gib=16.0))
  result = plan.plan(cfg)
  programs = result["programs"]
  assert set(programs) == {"pgm_image_efficient_step", "vq_decode_eval_batch",
                           "vq_decode_sample_grid"}
  assert programs["vq_decode_eval_batch"]["decode_batch"] == 2    # config.sample.batch_size
  assert programs["vq_decode_sample_grid"]["decode_batch"] == 3   # 3 classes x 1
  for prog in programs.values():
    assert prog["memory_per_device"]["peak_bytes"] > 0 and prog["fits"] is True
  assert programs["vq_decode_eval_batch"]["image_size"] == 32      # 4 codes x 8 px
  assert "vq_decode_sample_grid" in plan.format_table(result)


# -- without libtpu -------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.subprocess
def test_cpu_virtual_fallback_from_the_command_line(tmp_path):
  env = dict(os.environ, **{plan.NO_LIBTPU_ENV: "1"}, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, "-m", "pgm_jax.main", "--config=configs/shakespeare.py:tiny",
       f"--workdir={tmp_path}", "--mode=plan", f"--config.plan.topology={TOPOLOGY}",
       "--config.attn.impl=auto"],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=False, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "libtpu is not importable" in proc.stdout
  with open(tmp_path / "plan.json") as f:
    result = json.load(f)
  assert result["compiler"] == "cpu-virtual"
  assert result["topology"] == TOPOLOGY and result["num_devices"] == 4
  assert result["attn_impl"] == "xla"           # dense on CPU
  assert result["mesh_method"] == "reshape"     # CPU devices: their own order
  assert [d["id"] for d in result["mesh_device_order"]] == [0, 1, 2, 3]
  assert result["device_memory_gib"] == V5E_HBM_GIB and result["device_memory_source"] == "table"
  assert result["fits"] is True
