"""Tools: programs built on the library, at the top of the package (only `main` is above).

plan.py            --mode=plan: compile (not run) the train step / samplers for a TPU slice
bench.py           --mode=bench: sampling throughput and FLOPs, train-step speed (text)
bench_images.py    --mode=bench for image configs: PGM vs MaskGIT
convert.py         python -m pgm_jax.tools.convert: the authors' PyTorch checkpoints -> Orbax
preprocess.py      python -m pgm_jax.tools.preprocess: corpus -> packed ArrayRecord blocks
imagenet_codes.py  images -> VQ-8 code records (preprocess --tokenizer=vq_ds8)
tokenizers.py      python -m pgm_jax.tools.tokenizers: train a SentencePiece model
vq.py              python -m pgm_jax.tools.vq: LlamaGen's VQ-8 .pt -> .npz
eval_assets.py     python -m pgm_jax.tools.eval_assets: GPT-2 judge, FID Inception, FID stats
"""
