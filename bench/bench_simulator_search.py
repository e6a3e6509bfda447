"""Simulator speed: layouts costed per second by the layout search of Pangu Ultra MoE 718B on 6,144
Ascend 910B NPUs, with and without the memory pruning (baseline: no pruning, same run), and the cost
of one closed-form estimate against one event-level timeline estimate.

    .venv/bin/python bench/bench_simulator_search.py
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from simulator.cost import Simulator  # noqa: E402
from simulator.hardware import load_hardware  # noqa: E402
from simulator.recipe import load_sim_recipe  # noqa: E402
from simulator.search import LayoutSpace, search_layouts  # noqa: E402


def main() -> None:
    r = load_sim_recipe(ROOT / "configs" / "simulator" / "pangu_718b_6k_910b.yaml")
    hw = load_hardware(r.hardware)
    space = LayoutSpace(global_batch_size=r.layout.global_batch_size, seq_len=r.layout.seq_len)
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; space {space.size():,} points")
    rows = []
    for prune in (False, True):
        sim = Simulator(r.model, hw, r.num_devices, r.options)  # fresh caches for each run
        c0 = time.process_time()
        res = search_layouts(sim, space, rerank=20, prune_memory=prune)
        cpu = time.process_time() - c0
        rows.append((prune, res, cpu))
        print(f"prune_memory={prune!s:5}: {res.evaluated:,} costed, {res.feasible:,} fit, {res.seconds:.1f} s wall "
              f"({res.evaluated / res.seconds:,.0f} layouts/s), {cpu:.1f} s CPU "
              f"({res.evaluated / cpu:,.0f}/s); best {res.best[0].layout.short()} {res.best[0].step_time:.3f} s")
    (_, base, _), (_, pruned, _) = rows
    print(f"ratio wall time no-prune / prune: {base.seconds / pruned.seconds:.2f}x; same best layout: "
          f"{base.best[0].layout == pruned.best[0].layout}")
    sim = Simulator(r.model, hw, r.num_devices, r.options)
    n = 200
    t0 = time.perf_counter()
    for _ in range(n):
        sim.clear_cache()  # cold: every layer cost is recomputed
        sim.quick(r.layout)
    quick = (time.perf_counter() - t0) / n
    t0 = time.perf_counter()
    for _ in range(5):
        sim.estimate(r.layout)
    full = (time.perf_counter() - t0) / 5
    print(f"one estimate from cold caches: closed form {quick * 1e3:.2f} ms, event timeline {full * 1e3:.1f} ms "
          f"(ratio {full / quick:.0f}x)")


if __name__ == "__main__":
    main()
