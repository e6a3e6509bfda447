"""Process-group start-up for `torchrun` launches, and the local runtime for a single process.

`init_distributed(recipe)` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT), validates the parallel layout against the world size and the model *before* any
process group exists (a bad layout is one ConfigError on every rank, not a hang), binds this
process to its device (LOCAL_RANK on npu/cuda), initialises the backend for the device (hccl, nccl
or gloo) and returns the `ParallelRuntime`. With WORLD_SIZE unset or 1 and a trivial layout it
returns a `LocalRuntime` (the same interface) and nothing distributed happens.

Every wait for a peer (start-up, each collective) gives up after `resilience.collective_timeout_s`.
A `PeerWatch` then says which rank stopped answering (`peer_failure_message`): train.py prints
that one line instead of the backend's traceback and exits nonzero.
"""
from __future__ import annotations

import os
import re
import threading
import time
from datetime import timedelta
from typing import Optional

import torch.distributed as dist

from launch.trainer.recipe import Recipe
from parallel.device import backend_for, resolve_device_type, set_local_device
from parallel.fb_overlap import BackwardLane
from parallel.runtime import LocalRuntime, ParallelRuntime, Runtime, validate_layout


def world_from_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them; (0, 1, 0) outside torchrun."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def init_distributed(recipe: Recipe) -> Runtime:
    global _watch
    timeout_s = recipe.resilience.collective_timeout_s
    rank, world, local_rank = world_from_env()
    # raises ConfigError; no group exists yet
    layout = validate_layout(recipe.parallel, recipe.model, world, recipe.train.grad_accum)
    device = resolve_device_type(recipe.train.device)
    if world == 1:
        return LocalRuntime(layout, device, backward_lane=BackwardLane() if recipe.parallel.fb_overlap else None)
    set_local_device(device, local_rank)
    if not dist.is_initialized():
        timeout = timedelta(seconds=timeout_s)
        store, _, _ = next(dist.rendezvous("env://", rank, world, timeout=timeout))
        # torchrun's agent keeps one store across restarts: without a per-attempt prefix a
        # restarted rank can read the dead attempt's gloo/HCCL addresses and fail to connect.
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.PrefixStore(f"attempt_{attempt}/", store)
        _watch = PeerWatch(store, rank, world, timeout_s)
        dist.init_process_group(backend_for(device), store=store, rank=rank, world_size=world, timeout=timeout)
    return ParallelRuntime.setup(recipe.parallel, recipe.model, device)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


_watch: Optional["PeerWatch"] = None


class PeerWatch:
    """Which ranks stopped answering. Each rank bumps its counter in the rendezvous store from a
    daemon thread, which keeps running while the main thread waits in a collective; a stopped
    (SIGSTOP), hung or dead process stops bumping. After a failure the first rank to claim the
    check compares all counters over a few beats and publishes the verdict to the others, so the
    store serves O(world) requests, not O(world^2)."""

    def __init__(self, store, rank: int, world: int, timeout_s: float):
        self.store, self.rank, self.world, self.timeout_s = store, rank, world, timeout_s
        self.beat_s = min(max(timeout_s / 10, 0.5), 10.0)  # light on a 6K-rank store, quick in tests
        self._count = 0
        self._bump(store)  # before the process group: a rank without a counter never started
        threading.Thread(target=self._beat, args=(store.clone(),), daemon=True, name="peer-watch").start()

    def _bump(self, store) -> None:
        self._count += 1
        store.set(f"alive/{self.rank}", str(self._count))

    def _beat(self, store) -> None:
        while True:
            time.sleep(self.beat_s)
            try:
                self._bump(store)
            except Exception:  # the store is gone; the failure path reports it
                return

    def silent_ranks(self) -> Optional[list[int]]:
        """Ranks whose counter did not move (or never existed); None if the store cannot be asked."""
        keys = [f"alive/{r}" for r in range(self.world)]
        store = self.store
        try:
            store.set_timeout(timedelta(seconds=3 * self.beat_s + 5))  # never wait the full timeout again
            if store.add("alive/claim", 1) == 1:
                missing = [] if store.check(keys) else [r for r in range(self.world) if not store.check([keys[r]])]
                present = [r for r in range(self.world) if r not in missing]
                before = store.multi_get([keys[r] for r in present])
                time.sleep(2.5 * self.beat_s)
                after = store.multi_get([keys[r] for r in present])
                silent = missing + [r for r, a, b in zip(present, before, after) if a == b]
                store.set("alive/verdict", ",".join(map(str, sorted(silent))))
            else:
                store.wait(["alive/verdict"])
            return [int(r) for r in store.get("alive/verdict").decode().split(",") if r]
        except Exception:
            return None


_PEER_ERROR = re.compile(r"gloo|NCCL|HCCL|[Tt]imed out|Connection (reset|closed) by peer|[Bb]roken pipe")


def is_peer_failure(e: BaseException) -> bool:
    """A collective (or the rendezvous) failed because a peer did not answer or went away."""
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return False
    return isinstance(e, dist.DistError) or (isinstance(e, RuntimeError) and bool(_PEER_ERROR.search(str(e))))


def peer_failure_message(e: BaseException, timeout_s: float) -> str:
    """One line for `e` (is_peer_failure): which rank stopped answering and what to do."""
    rank, world, _ = world_from_env()
    setting = f"resilience.collective_timeout_s={timeout_s:g}"
    text = str(e)
    why = (f"no answer within {setting} s" if re.search(r"[Tt]imed out|[Tt]imeout", text)
           else "a peer closed its connection" if re.search(r"reset|closed|[Bb]roken pipe", text)
           else text.strip().splitlines()[-1][:160] if text.strip() else type(e).__name__)
    silent = _watch.silent_ranks() if _watch is not None else None
    if silent:
        who = f"rank {silent[0]}" if len(silent) == 1 else "ranks " + ", ".join(map(str, silent))
        return (f"rank {rank}: {who} of {world} stopped answering ({why}): stopped, hung or exited, see its "
                "log; restart the job to resume from the last checkpoint")
    if silent == []:
        return (f"rank {rank}: a collective failed ({why}) although every rank still answers: one is slower "
                f"than {setting} allows, or the ranks called different collectives; raise "
                "resilience.collective_timeout_s if a step or checkpoint save can take longer")
    return (f"rank {rank}: the process group of {world} ranks failed ({why}) and which rank stopped answering "
            "cannot be known (the rendezvous store did not answer either, or the group never formed); check "
            "every rank's log and host, or raise resilience.collective_timeout_s")
