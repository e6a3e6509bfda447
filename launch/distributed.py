"""Process-group start-up for `torchrun` launches, and the no-op path for a single process.

`init_distributed(recipe)` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT), validates the parallel layout against the world size and the model *before* any
process group exists (a bad layout is one ConfigError on every rank, not a hang; so is tensor
parallelism with checkpointing, which cannot record TP shards yet), binds this
process to its device (LOCAL_RANK on npu/cuda), initialises the backend for the device (hccl, nccl
or gloo) and returns the `ParallelRuntime`. With WORLD_SIZE unset or 1 and a trivial layout it
returns None and nothing distributed happens.
"""
from __future__ import annotations

import os
from datetime import timedelta
from typing import Optional

import torch.distributed as dist

from launch.recipe import Recipe
from moe.config import ConfigError
from parallel.device import backend_for, resolve_device_type, set_local_device
from parallel.runtime import ParallelRuntime, validate_layout


def world_from_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them; (0, 1, 0) outside torchrun."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def check_checkpoint_support(recipe: Recipe) -> None:
    """Checkpoints record expert-parallel rows only (launch/checkpoint_state.placements): a
    tensor-parallel shard would be written as if it were the whole tensor, the TP ranks' different
    slices under one name. Until placements read `ParallelRuntime.shards`, refuse to run tp > 1 with
    any save or load."""
    ck, res = recipe.checkpoint, recipe.resilience
    if recipe.parallel.tp > 1 and (ck.save_at_end or ck.interval or ck.resume != "never" or res.handle_signals):
        raise ConfigError(f"parallel.tp: checkpoints cannot record tensor-parallel shards yet, so "
                          f"tp={recipe.parallel.tp} runs without them: set checkpoint.save_at_end=false "
                          "checkpoint.interval=0 checkpoint.resume=never resilience.handle_signals=false")


def init_distributed(recipe: Recipe, timeout_s: float = 600.0) -> Optional[ParallelRuntime]:
    rank, world, local_rank = world_from_env()
    validate_layout(recipe.parallel, recipe.model, world)  # raises ConfigError; no group exists yet
    check_checkpoint_support(recipe)
    if world == 1:
        return None
    device = resolve_device_type(recipe.train.device)
    set_local_device(device, local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend_for(device), rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s))
    return ParallelRuntime.setup(recipe.parallel, recipe.model, device)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
