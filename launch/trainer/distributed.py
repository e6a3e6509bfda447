"""Process-group start-up for `torchrun` launches, and the local runtime for a single process.

`init_distributed(recipe)` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT), validates the parallel layout against the world size and the model *before* any
process group exists (a bad layout is one ConfigError on every rank, not a hang), binds this
process to its device (LOCAL_RANK on npu/cuda), initialises the backend for the device (hccl, nccl
or gloo) and returns the `ParallelRuntime`. With WORLD_SIZE unset or 1 and a trivial layout it
returns a `LocalRuntime` (the same interface) and nothing distributed happens.
"""
from __future__ import annotations

import os
from datetime import timedelta
import torch.distributed as dist

from launch.trainer.recipe import Recipe
from parallel.device import backend_for, resolve_device_type, set_local_device
from parallel.runtime import LocalRuntime, ParallelRuntime, Runtime, validate_layout


def world_from_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them; (0, 1, 0) outside torchrun."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def init_distributed(recipe: Recipe, timeout_s: float = 600.0) -> Runtime:
    rank, world, local_rank = world_from_env()
    layout = validate_layout(recipe.parallel, recipe.model, world)  # raises ConfigError; no group exists yet
    device = resolve_device_type(recipe.train.device)
    if world == 1:
        return LocalRuntime(layout, device)
    set_local_device(device, local_rank)
    if not dist.is_initialized():
        timeout = timedelta(seconds=timeout_s)
        store, _, _ = next(dist.rendezvous("env://", rank, world, timeout=timeout))
        # torchrun's agent keeps one store across restarts: without a per-attempt prefix a
        # restarted rank can read the dead attempt's gloo/HCCL addresses and fail to connect.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(backend_for(device), store=dist.PrefixStore(f"attempt_{attempt}/", store),
                                rank=rank, world_size=world, timeout=timeout)
    return ParallelRuntime.setup(recipe.parallel, recipe.model, device)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
