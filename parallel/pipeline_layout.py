"""Which transformer layers each pipeline stage holds: pure arithmetic, no process group.

The depth splits into pp * vpp virtual stages; virtual stage s = chunk * pp + rank runs on pipeline
rank `rank` (Megatron's interleaving: rank r holds chunks r, r + pp, r + 2 pp, ...). Real layers
fill the virtual stages in order. The sizes come from `parallel.pp_stage_layers` when given, else
every stage has (num_layers + noop_layers) / (pp * vpp) slots and the no-op layers take the slots
`parallel.layout.noop_placement` gives them. `stage_sizes` is that rule, and the simulator's stage
costs (simulator/cost.py) call it too, so they describe the stages the runtime builds, explicit
lists included. The embedding lives on virtual stage 0; the final norm, head, loss and MTP modules
on the last one.
"""
from __future__ import annotations

from dataclasses import dataclass

from moe.config import ModelConfig
from parallel.config import ParallelConfig, check_pipeline
from parallel.layout import noop_placement


@dataclass(frozen=True)
class StagePlan:
    pp: int
    vpp: int
    layers: tuple[tuple[int, ...], ...]  # global layer indices of each virtual stage

    @property
    def num_stages(self) -> int:
        return self.pp * self.vpp

    def stages_of(self, pp_rank: int) -> list[int]:
        """The virtual stages pipeline rank `pp_rank` runs, in chunk order."""
        return [c * self.pp + pp_rank for c in range(self.vpp)]

    def describe(self) -> str:
        return "; ".join(f"stage {s}: layers {list(ls) if ls else '-'}" for s, ls in enumerate(self.layers))


def stage_sizes(pp: int, vpp: int, num_layers: int, noop_layers: int = 0,
                stage_layers=None) -> list[tuple[int, int]]:
    """(real layers, no-op layers) of every virtual stage s = chunk * pp + rank: `stage_layers` (one
    real-layer count per virtual stage) when given, else equal stages of (num_layers + noop_layers)
    / (pp * vpp) slots with the no-op layers placed by `noop_placement`. No checks here: the runtime
    checks the layout first (`check_pipeline`); the simulator also passes its own padded no-op count."""
    if stage_layers is not None:
        return [(n, 0) for n in stage_layers]
    chunks = pp * vpp
    per_chunk = (num_layers + noop_layers) // chunks
    noops = noop_placement(pp, vpp, per_chunk, noop_layers) if noop_layers else [0] * chunks
    return [(per_chunk - n, n) for n in noops]


def stage_plan(cfg: ParallelConfig, model: ModelConfig) -> StagePlan:
    """The layers of every virtual stage (raises ConfigError when they cannot be split as asked)."""
    check_pipeline(cfg, model)
    out, start = [], 0
    for n, _ in stage_sizes(cfg.pp, cfg.vpp, model.num_layers, model.noop_layers, cfg.pp_stage_layers):
        out.append(tuple(range(start, start + n)))
        start += n
    return StagePlan(cfg.pp, cfg.vpp, tuple(out))
