"""The test markers of pytest.ini: registered, and the fast subset (-m "not slow") keeps at
least one test of every tests/test_*.py, so that no module drops out of it unnoticed."""
import glob
import json
import os
import subprocess
import sys

from conftest import REPO_ROOT

# A plugin for the collecting subprocess: every collected test with its marker names, and
# the modules skipped whole at import (pytest.importorskip of an optional extra).
PLUGIN = '''
import json, os

SKIPPED = []

def pytest_collectreport(report):
  if report.skipped:
    SKIPPED.append(report.nodeid)

def pytest_collection_modifyitems(session, config, items):
  with open(os.environ["MARKERS_OUT"], "w") as f:
    json.dump({"skipped": SKIPPED,
               "items": [[item.nodeid, sorted(m.name for m in item.iter_markers())]
                         for item in items]}, f)
'''


def test_markers_are_registered_and_strict(pytestconfig):
  names = {line.split(":")[0].strip() for line in pytestconfig.getini("markers")}
  assert {"slow", "multiprocess", "tpu_compile", "subprocess"} <= names
  assert pytestconfig.getoption("strict_markers")


def test_every_module_has_a_fast_test(tmp_path):
  (tmp_path / "markers_plugin.py").write_text(PLUGIN)
  out = tmp_path / "items.json"
  env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "MARKERS_"))}
  env.update(MARKERS_OUT=str(out), PYTHONPATH=os.pathsep.join(
      [str(tmp_path), REPO_ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])))
  # The whole suite, collected (no test runs) as the README's command collects it.
  res = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                        "-p", "markers_plugin", "-p", "no:cacheprovider", "tests"],
                       cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
  got = json.loads(out.read_text())
  items = got["items"]
  modules = {os.path.relpath(p, REPO_ROOT)
             for p in glob.glob(os.path.join(REPO_ROOT, "tests", "test_*.py"))}
  modules -= set(got["skipped"])           # e.g. test_tpu_compile.py without libtpu
  assert {nodeid.split("::")[0] for nodeid, _ in items} == modules
  fast = {nodeid.split("::")[0] for nodeid, marks in items if "slow" not in marks}
  assert sorted(modules - fast) == [], "modules with no test outside `slow`"
  # Several real processes, or the TPU compiler: never in the fast subset.
  leaks = [nodeid for nodeid, marks in items
           if {"multiprocess", "tpu_compile"} & set(marks) and "slow" not in marks]
  assert leaks == [], "multiprocess / tpu_compile tests not marked slow"
