"""One validation case in its own process: the trainer's own build and step functions
(`launch.train`), timed per step by wall clock and by this thread's CPU time.

Usage: python -m simulator.validate_worker RECIPE.yaml STEPS OUT.json
"""
from __future__ import annotations

import json
import sys
import time


def main(argv: list[str]) -> int:
    recipe_path, steps, out = argv[0], int(argv[1]), argv[2]
    import torch
    from launch import train
    from launch.recipe import load_recipe
    recipe = load_recipe(recipe_path)
    t = recipe.train
    train.seed_everything(t.seed)
    model = train.build_model(recipe, "cpu")
    optimizer = train.build_optimizer(model, t)
    batches, _ = train.build_data(recipe)
    rows = []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = train.lr_at(step, t)
        w0, c0 = time.perf_counter(), time.thread_time()
        train.train_step(model, optimizer, batches, t, "cpu")
        rows.append({"wall_s": time.perf_counter() - w0, "cpu_s": time.thread_time() - c0})
    with open(out, "w") as f:
        json.dump({"threads": torch.get_num_threads(), "steps": rows}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
