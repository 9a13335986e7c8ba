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


def test_experiment_sits_below_the_tools():
  """train / evaluation / samplers / convert use experiment; experiment uses none of them."""
  edges = import_graph()
  for tool in ("pgm_jax.train", "pgm_jax.evaluation", "pgm_jax.sample",
               "pgm_jax.tools.convert"):
    assert "pgm_jax.experiment" in edges[tool], tool
  above = {"pgm_jax.train", "pgm_jax.evaluation", "pgm_jax.sample",
           "pgm_jax.tools.convert", "pgm_jax.main", "pgm_jax.tools.bench", "pgm_jax.tools.plan"}
  assert not edges["pgm_jax.experiment"] & above


@pytest.mark.parametrize("module", ["pgm_jax.main", "pgm_jax.tools.preprocess", "pgm_jax.tools.tokenizers",
                                    "pgm_jax.tools.convert", "pgm_jax.tools.eval_assets"])
def test_entry_points_import(module):
  assert callable(importlib.import_module(module).main)
