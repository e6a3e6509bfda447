"""Training data: tokenizers (`tokenizer.py`), the embedded synthetic corpus (`corpus.py`), writing
Megatron indexed datasets (`prepare.py`, behind `python -m launch.prepare_data`) and building the
train/validation datasets and batch iterators the trainer reads (`datasets.py`)."""
