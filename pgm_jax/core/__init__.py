"""Infrastructure below everything else: nothing here knows a model, a loss or a sampler.

cli.py            one-line errors and exit codes for every command-line entry point
fileio.py         atomic writes, writability checks (local paths and gs://)
config_lib.py     the base experiment configs, presets (`parse_arg`), config checks
sharding.py       the device mesh, logical axis rules, batch and parameter shardings
checkpointing.py  the one Orbax manager (state + data iterator), restore with fallback
metric_writers.py TensorBoard event files (tensorboardX) and metrics.jsonl
"""
