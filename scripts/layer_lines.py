"""Lines of code per layer of pgm_jax (docs/layout.md), for a checkout at ROOT.

    python scripts/layer_lines.py [ROOT]

Works on the layered tree and on checkouts from before the layering (the old paths are
mapped to the layer their code now sits in), so that the two can be compared.
"""
import pathlib, sys
root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else pathlib.Path(__file__).resolve().parents[1]) / "pgm_jax"
# old -> layer by module name (works for both trees)
layers = [("core", ["core/", "cli.py", "fileio.py", "sharding.py", "checkpointing.py", "metric_writers.py", "config_lib.py"]),
          ("ops, io, data", ["ops/", "io/", "data/"]),
          ("models", ["models/", "evaluation/inception.py"]),
          ("objectives, samplers", ["objectives.py", "samplers/"]),
          ("families", ["families/"]),
          ("steps", ["steps.py", "distill.py"]),
          ("experiment", ["experiment.py"]),
          ("programs", ["train.py", "sample.py", "evaluation/", "samplers/generate.py"]),
          ("tools", ["tools/", "plan.py", "bench.py", "bench_images.py", "convert.py", "data/preprocess.py", "evaluation/__main__.py"]),
          ("main", ["main.py"]),
          ("outside (package root, moved-command stubs)", ["__init__.py", "preprocess.py", "tokenizers.py"])]
counts = {n: 0 for n, _ in layers}
for p in sorted(root.rglob("*.py")):
    rel = str(p.relative_to(root))
    best = None
    for name, pats in layers:
        for pat in pats:
            if (rel == pat or (pat.endswith("/") and rel.startswith(pat))) and (best is None or len(pat) > best[1]):
                best = (name, len(pat))
    counts[best[0]] += len(p.read_text().splitlines())
for n, c in counts.items(): print(f"{n:45s} {c:6d}")
print("total", sum(counts.values()))
