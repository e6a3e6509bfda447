"""The training entry point (`python -m launch.train --recipe R.yaml`, `ultramoe train`, or under
`torchrun`): parses the command line and runs the trainer (`launch/trainer/`), turning its errors
into one line and an exit status.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional

from config import ConfigError, parse_overrides
from launch.checkpoint.files import CheckpointError
from launch.trainer.distributed import is_peer_failure, peer_failure_message, shutdown
from launch.trainer.loop import run
from launch.trainer.recipe import load_recipe
from launch.trainer.resilience import TrainingAborted

__all__ = ["main", "run"]


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(
        prog="ultramoe-train", description="Train an MoE model from a recipe YAML (also under torchrun).",
        epilog="Example: python -m launch.train --recipe configs/recipes/tiny_cpu.yaml train.steps=50")
    ap.add_argument("--recipe", required=True, help="recipe YAML (model, train, data, parallel sections)")
    ap.add_argument("overrides", nargs="*", help="section.field=value overrides, e.g. train.lr=1e-3")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    args = ap.parse_args(argv)
    recipe = None
    try:
        recipe = load_recipe(args.recipe, parse_overrides(args.overrides))
        run(recipe, progress=not args.no_progress and None)
        shutdown()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (CheckpointError, TrainingAborted) as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except Exception as e:  # a peer stopped answering: name it instead of the backend's traceback
        if recipe is None or not is_peer_failure(e):
            raise
        print(f"error: {peer_failure_message(e, recipe.resilience.collective_timeout_s)}", file=sys.stderr, flush=True)
        return 4
    return 0


if __name__ == "__main__":
    sys.exit(main())
