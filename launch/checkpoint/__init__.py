"""Training checkpoints: `checkpointer.py` saves and loads them (atomic, verified, rotated, async),
`state.py` says what they hold as layout-independent tensors, `files.py` is the on-disk format."""
