"""One validation case of `simulate validate` in its own process (or one rank of it, under
torchrun): the trainer's public set-up (`launch.trainer.setup.build_context`) and step
(`TrainingContext.train_step`), as the training loop calls them, timed per step.

Per step it records wall time, this thread's CPU time, and this thread's run-queue delay (time it
was ready to run but another process held the core, from /proc/thread-self/schedstat). Busy time =
wall - run-queue delay: what the step would take on cores of its own, waits for peers included.
It also records the expert-parallel load imbalance the step's routing produced, under pipeline
parallelism the step's measured bubble fraction (parallel/pipeline_schedule.py), and after each
step, outside the timed region and on all ranks at once, the speed probe (`simulator/probe.py`):
how fast the machine ran around that step. The step's measured memory (`mem_*`: saved activations
at peak, swapped bytes, optimizer bytes on the device and the host) rides along for memory cases.

Usage: python -m launch.validate_worker RECIPE.yaml STEPS OUT_PREFIX   (writes OUT_PREFIX.rank<r>.json)
"""
from __future__ import annotations

import json
import sys
import time


def run_delay() -> float:
    """Seconds this thread has spent waiting on a run queue (0 where schedstat is unavailable)."""
    try:
        with open("/proc/thread-self/schedstat") as f:
            return int(f.read().split()[1]) * 1e-9
    except (OSError, IndexError, ValueError):
        return 0.0


def ep_imbalance(expert_load: list, ep: int) -> float:
    """Mean over MoE layers of (busiest expert-parallel rank's token copies / the mean rank's):
    the factor by which the slowest rank's expert work and exchange exceed the average. Experts
    are split over ranks in contiguous blocks."""
    ratios = []
    for load in expert_load:
        if ep <= 1 or not load or len(load) % ep:
            continue
        per = len(load) // ep
        ranks = [sum(load[i * per:(i + 1) * per]) for i in range(ep)]
        mean = sum(ranks) / ep
        if mean > 0:
            ratios.append(max(ranks) / mean)
    return sum(ratios) / len(ratios) if ratios else 1.0


def global_load(expert_load: list, runtime) -> list:
    """Per-layer expert loads summed over all ranks (outside the timed region): an expert's rank
    receives tokens from every rank of its EP group, and EP groups are statistically alike."""
    if runtime.layout.world == 1 or not expert_load:
        return expert_load
    import torch
    import torch.distributed as dist
    t = torch.tensor(expert_load, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def timed_step(ctx, step: int) -> dict:
    """One training step: wall, thread CPU and run-queue time, and the EP imbalance it routed."""
    w0, c0, d0 = time.perf_counter(), time.thread_time(), run_delay()
    m = ctx.train_step(step)
    wall, delay = time.perf_counter() - w0, run_delay() - d0
    return {"wall_s": wall, "cpu_s": time.thread_time() - c0, "run_delay_s": delay,
            "busy_s": max(0.0, wall - delay),
            "ep_imbalance": ep_imbalance(global_load(m.get("expert_load", []), ctx.runtime),
                                         ctx.recipe.parallel.expert_parallel),
            **{k: v for k, v in m.items() if k.startswith("mem_")}}  # measured bytes (parallel/memory.py)


def main(argv: list[str]) -> int:
    recipe_path, steps, out = argv[0], int(argv[1]), argv[2]
    import torch

    from launch.trainer.distributed import shutdown
    from launch.trainer.recipe import load_recipe
    from launch.trainer.setup import build_context
    from simulator.probe import SpeedProbe
    ctx = build_context(load_recipe(recipe_path), log=False, measure_peak=False)
    probe = SpeedProbe()
    rows = []
    try:
        for step in range(steps):
            rows.append(timed_step(ctx, step))
            runner = getattr(ctx.runtime, "runner", None)
            if runner is not None:  # pipeline: this step's measured bubble (a collective, untimed)
                rows[-1]["bubble_fraction"] = runner.step_metrics()["pp_bubble_fraction"]
            ctx.runtime.barrier()  # the ranks probe together, as they trained together
            rows[-1]["probe"] = probe.run()
    finally:
        shutdown()
    with open(f"{out}.rank{ctx.runtime.rank}.json", "w") as f:
        json.dump({"threads": torch.get_num_threads(), "steps": rows}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
