"""The trainer: `setup.build_context(recipe)` turns a recipe into a ready `TrainingContext` (runtime,
device, peak, model, optimizer, data); `step.py` holds one optimizer step, evaluation and the
learning-rate schedule; `loop.run` is the training loop (checkpoints and failure handling through
`resilience.Recovery`, metrics through `metrics.MetricsLogger`). `recipe.py` defines the recipe,
`distributed.py` starts the process group under torchrun."""
