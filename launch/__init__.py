"""Entry points: the torchrun training script and loop, data preparation, CLI commands."""
