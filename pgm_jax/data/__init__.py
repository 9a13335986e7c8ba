"""Data: tokenizers, Grain input pipelines and offline preprocessing.

tokenizers.py  GPT-2 BPE, SentencePiece, BERT WordPiece (vendored assets, no download)
pipeline.py    Grain train/eval iterators: text files, TFDS, packed ArrayRecord blocks, images
images.py      images as code grids: ImageVocab, the vendored digits, PNG grids
preprocess.py  corpus -> packed ArrayRecord blocks (`python -m pgm_jax.tools.preprocess`)
imagenet.py    images -> VQ-8 code records (`--tokenizer=vq_ds8`), the imagenet_codes records
"""
