"""Expert load from a measured run: the imbalance the simulator charges, with and without placement.

A training run with `placement.enabled` writes, per step and MoE layer, in its metrics.jsonl
(parallel/placement_runtime.py): `placement_imbalance_before`, max/mean tokens per EP rank had every
expert stayed on its contiguous rank, and `placement_imbalance_after`, the same under the placement
the step ran with; and the bytes its migrations moved (`placement_bytes`). A run that should only
record the load without moving experts sets a `placement.interval` longer than the run.

`read_load_trace` reduces the trace to what the cost model takes: the busiest EP rank's share sets
each MoE layer's pace and the layers add up, so the step's imbalance is the mean over layers of
the per-layer max/mean; over steps the median (warm-up steps included: placement needs them too).
`compare_placement` then estimates the layout twice, at the imbalance without and with placement,
and charges the migrations' bytes per step at the inter-node link of the profile (experts move
between EP ranks; the conservative link), so the report says whether placement pays on that
cluster. The trace should come from the model and EP size being estimated: its load (and the bytes
a migration moves) are that run's.
"""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

from config import ConfigError


@dataclass
class LoadTrace:
    steps: int
    before: float  # median over steps of the mean over MoE layers of max/mean tokens per EP rank
    after: float  # the same under the placement the steps ran with
    migration_bytes_per_step: float  # this rank's migration bytes, averaged over the steps
    migrations: int


def read_load_trace(path: str | Path) -> LoadTrace:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--load-trace: {p} does not exist; give a run's metrics.jsonl")
    before, after, sent, moved = [], [], 0.0, 0
    for n, line in enumerate(p.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--load-trace: {p} line {n} is not JSON ({e.msg}); give a run's metrics.jsonl") from None
        b, a = rec.get("placement_imbalance_before"), rec.get("placement_imbalance_after")
        if not b or not a:
            continue
        before.append(sum(b) / len(b))
        after.append(sum(a) / len(a))
        sent += float(rec.get("placement_bytes", 0))
        moved += int(rec.get("placement_migrations", 0))
    if not before:
        raise ConfigError(f"--load-trace: {p} has no placement_imbalance_before/after records; record the trace "
                          "with placement.enabled: true (a placement.interval longer than the run keeps the "
                          "experts in place)")
    return LoadTrace(len(before), statistics.median(before), statistics.median(after), sent / len(before), moved)


@dataclass
class PlacementVerdict:
    trace: LoadTrace
    step_without_s: float
    step_with_s: float  # at the placed imbalance, migrations included
    migration_s: float  # per step, amortised

    @property
    def saving_s(self) -> float:
        return self.step_without_s - self.step_with_s

    def describe(self) -> str:
        t = self.trace
        verdict = "pays" if self.saving_s > 0 else "does not pay"
        return (f"load trace: {t.steps} steps, expert-parallel imbalance (max/mean tokens per EP rank, mean over "
                f"layers, median over steps) {t.before:.3f} without placement, {t.after:.3f} with it; "
                f"{t.migrations} layer migrations, {t.migration_bytes_per_step / 2**20:.2f} MiB per step\n"
                f"  step without placement {self.step_without_s:.3f} s, with it {self.step_with_s:.3f} s "
                f"(migrations {self.migration_s * 1e3:.2f} ms per step): placement {verdict} "
                f"({self.saving_s:+.3f} s per step)")


def compare_placement(sim, layout, trace: LoadTrace) -> PlacementVerdict:
    """Estimates of `layout` at the trace's imbalance without and with placement (`sim`: a
    simulator.cost.Simulator; its other options are kept)."""
    from simulator.cost import Simulator
    times = []
    for imbalance in (trace.before, trace.after):
        opt = replace(sim.opt, expert_imbalance=max(1.0, imbalance))
        times.append(Simulator(sim.model, sim.hw, sim.num_devices, opt).estimate(layout).step_time)
    link = sim.hw.inter_node
    migration = trace.migration_bytes_per_step / (link.bandwidth_gbps * 1e9) if trace.migration_bytes_per_step else 0.0
    return PlacementVerdict(trace, times[0], times[1] + migration, migration)
