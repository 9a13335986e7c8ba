"""The package layout: no import cycles among pgm_jax modules, and entry points import.

Cycles are found on the static import graph (module-level and function-level imports
alike), so that a lazy import cannot hide one.
"""
import ast
import importlib
import pathlib

import pytest

PACKAGE_ROOT = pathlib.Path(__file__).resolve().parents[1] / "pgm_jax"


def _modules() -> dict:
  mods = {}
  for path in PACKAGE_ROOT.rglob("*.py"):
    parts = path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts
    name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    mods[name] = path
  return mods


def import_graph() -> dict:
  """module -> the pgm_jax modules it imports (a package counts as imported with its
  submodules, as Python runs the package's __init__ first)."""
  mods = _modules()
  edges = {m: set() for m in mods}
  for name, path in mods.items():
    for node in ast.walk(ast.parse(path.read_text())):
      targets = []
      if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pgm_jax"):
        for alias in node.names:
          sub = f"{node.module}.{alias.name}"
          targets.append(sub if sub in mods else node.module)
      elif isinstance(node, ast.Import):
        targets += [a.name for a in node.names if a.name.startswith("pgm_jax")]
      for target in targets:
        parts = target.split(".")
        for i in range(2, len(parts) + 1):  # the target and its parent packages
          parent = ".".join(parts[:i])
          if parent in mods and parent != name and not name.startswith(parent + "."):
            edges[name].add(parent)
  return edges


def find_cycles(edges: dict) -> list:
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on_stack, cycles = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(edges[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        cycles.append(sorted(component))

  for v in sorted(edges):
    if v not in index:
      visit(v)
  return cycles


def test_cycle_finder_finds_a_planted_cycle():
  edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
  assert find_cycles(edges) == [["a", "b", "c"]]


def test_no_import_cycles():
  edges = import_graph()
  assert "pgm_jax.experiment" in edges and "pgm_jax.samplers.pgm" in edges
  assert find_cycles(edges) == []


# The layers, lowest first. A module may import its own layer or a lower one, never a
# higher one (docs/layout.md). Every module of the package must be in exactly one layer.
LAYERS = (
    ("core", ("pgm_jax.core",)),
    ("ops, io, data", ("pgm_jax.ops", "pgm_jax.io", "pgm_jax.data")),
    ("models", ("pgm_jax.models",)),
    ("objectives, samplers", ("pgm_jax.objectives", "pgm_jax.samplers")),
    ("families", ("pgm_jax.families",)),
    ("steps", ("pgm_jax.steps", "pgm_jax.distill")),
    ("experiment", ("pgm_jax.experiment",)),
    ("programs", ("pgm_jax.train", "pgm_jax.evaluation", "pgm_jax.sample")),
    ("tools", ("pgm_jax.tools",)),
    ("main", ("pgm_jax.main",)),
)
# The package root (a version string and REPO_ROOT) and the one-line errors left at the old
# command names sit outside the layers and import nothing.
OUTSIDE = ("pgm_jax", "pgm_jax.convert", "pgm_jax.preprocess", "pgm_jax.tokenizers",
           "pgm_jax.evaluation.__main__")


def layer_of(module: str) -> int:
  for i, (_, prefixes) in enumerate(LAYERS):
    if any(module == p or module.startswith(p + ".") for p in prefixes):
      return i
  raise KeyError(module)


def layer_violations(edges: dict) -> list:
  out = []
  for mod, targets in edges.items():
    if mod in OUTSIDE:
      continue
    for target in targets:
      if target == "pgm_jax":
        continue  # pgm_jax/__init__.py: REPO_ROOT, __version__
      if layer_of(target) > layer_of(mod):
        out.append(f"{mod} ({LAYERS[layer_of(mod)][0]}) imports {target} "
                   f"({LAYERS[layer_of(target)][0]})")
  return sorted(out)


def test_every_module_has_a_layer():
  edges = import_graph()
  for mod in edges:
    if mod not in OUTSIDE:
      layer_of(mod)
  for mod in OUTSIDE:
    assert not edges.get(mod), f"{mod} must import nothing from pgm_jax"


def test_imports_only_point_down():
  assert layer_violations(import_graph()) == []


def test_layer_check_finds_a_planted_upward_import():
  edges = {"pgm_jax.models.dit": {"pgm_jax.samplers.pgm"}, "pgm_jax.samplers.pgm": set()}
  assert layer_violations(edges) == [
      "pgm_jax.models.dit (models) imports pgm_jax.samplers.pgm (objectives, samplers)"]


def kind_comparisons(path: pathlib.Path, kinds) -> list:
  """`==`, `!=`, `in`, `not in` of a model-kind string, of a tuple/set of them, or of a
  `*.kind` / `*_KINDS` name of a model, in one file (line numbers)."""
  hits = []
  for node in ast.walk(ast.parse(path.read_text())):
    if not isinstance(node, ast.Compare):
      continue
    for side in [node.left] + node.comparators:
      strings = []
      if isinstance(side, ast.Constant) and isinstance(side.value, str):
        strings = [side.value]
      elif isinstance(side, (ast.Tuple, ast.Set, ast.List)):
        strings = [e.value for e in side.elts if isinstance(e, ast.Constant)]
      named = ((isinstance(side, ast.Attribute) and side.attr == "kind"
                and isinstance(side.value, ast.Attribute)
                and side.value.attr in ("model", "model_cfg", "config"))
               or (isinstance(side, (ast.Name, ast.Attribute))
                   and getattr(side, "id", getattr(side, "attr", "")).endswith("_KINDS")
                   and getattr(side, "id", getattr(side, "attr", "")) != "MASK_KINDS"))
      if named or any(s in kinds for s in strings):
        hits.append(f"{path.relative_to(PACKAGE_ROOT.parent)}:{node.lineno}")
        break
  return hits


def test_no_model_kind_comparisons_outside_the_registry():
  """Code outside pgm_jax/families asks the family; it never compares a kind string."""
  from pgm_jax import families  # pylint: disable=g-import-not-at-top
  hits = []
  for path in sorted(PACKAGE_ROOT.rglob("*.py")):
    if "families" not in path.relative_to(PACKAGE_ROOT).parts:
      hits += kind_comparisons(path, set(families.KINDS))
  assert hits == []


def test_kind_check_finds_planted_comparisons(tmp_path):
  planted = PACKAGE_ROOT / "_planted_kind_check.py"
  planted.write_text('def f(config, k):\n  a = config.model.kind == "x"\n'
                     '  b = k in ("pgm", "mdlm")\n  return a, b, k == "uniform"\n')
  try:
    assert kind_comparisons(planted, {"pgm", "mdlm"}) == [
        "pgm_jax/_planted_kind_check.py:2", "pgm_jax/_planted_kind_check.py:3"]
  finally:
    planted.unlink()


def test_experiment_sits_below_the_tools():
  """train / evaluation / samplers / convert use experiment; experiment uses none of them."""
  edges = import_graph()
  for tool in ("pgm_jax.train", "pgm_jax.evaluation", "pgm_jax.sample",
               "pgm_jax.tools.convert"):
    assert "pgm_jax.experiment" in edges[tool], tool
  above = {"pgm_jax.train", "pgm_jax.evaluation", "pgm_jax.sample",
           "pgm_jax.tools.convert", "pgm_jax.main", "pgm_jax.tools.bench", "pgm_jax.tools.plan"}
  assert not edges["pgm_jax.experiment"] & above


@pytest.mark.parametrize("module", ["pgm_jax.main", "pgm_jax.tools.preprocess",
                                    "pgm_jax.tools.tokenizers", "pgm_jax.tools.convert",
                                    "pgm_jax.tools.eval_assets", "pgm_jax.tools.vq"])
def test_entry_points_import(module):
  assert callable(importlib.import_module(module).main)


@pytest.mark.parametrize("old,new", [("convert", "tools.convert"),
                                     ("preprocess", "tools.preprocess"),
                                     ("tokenizers", "tools.tokenizers"),
                                     ("evaluation", "tools.eval_assets")])
def test_old_command_names_say_where_they_moved(old, new):
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  proc = subprocess.run([sys.executable, "-m", f"pgm_jax.{old}", "--help"],
                        cwd=PACKAGE_ROOT.parent, capture_output=True, text=True, timeout=60,
                        check=False)
  assert proc.returncode != 0
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and f"python -m pgm_jax.{new}" in lines[0], proc.stderr
