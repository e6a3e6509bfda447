"""Hugging Face conversion: `export.py` (`ultramoe export-hf`: a checkpoint -> config.json +
safetensors with DeepSeek-V3 names) and `import_.py` (`ultramoe import-hf`: back to a weights-only
checkpoint). The parameter-name map itself lives beside the model, in `moe/hf_names.py`."""
