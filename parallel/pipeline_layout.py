"""Which transformer layers each pipeline stage holds: pure arithmetic, no process group.

The depth splits into pp * vpp virtual stages; virtual stage s = chunk * pp + rank runs on pipeline
rank `rank` (Megatron's interleaving: rank r holds chunks r, r + pp, r + 2 pp, ...). Real layers
fill the virtual stages in order. The sizes come from `parallel.pp_stage_layers` when given, else
every stage has (num_layers + noop_layers) / (pp * vpp) slots and the no-op layers take the slots
`parallel.layout.noop_placement` gives them (the simulator places them with the same function, so
its stage costs describe the stages the runtime builds). The embedding lives on virtual stage 0;
the final norm, head, loss and MTP modules on the last one.
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


def stage_plan(cfg: ParallelConfig, model: ModelConfig) -> StagePlan:
    """The layers of every virtual stage (raises ConfigError when they cannot be split as asked)."""
    check_pipeline(cfg, model)
    chunks = cfg.pp * cfg.vpp
    if cfg.pp_stage_layers is not None:
        sizes = list(cfg.pp_stage_layers)
    else:
        per_chunk = (model.num_layers + model.noop_layers) // chunks
        noops = noop_placement(cfg.pp, cfg.vpp, per_chunk, model.noop_layers) if model.noop_layers else [0] * chunks
        sizes = [per_chunk - n for n in noops]
    out, start = [], 0
    for n in sizes:
        out.append(tuple(range(start, start + n)))
        start += n
    return StagePlan(cfg.pp, cfg.vpp, tuple(out))
