"""Expert placement planner: predict each expert's load, pack experts into EP ranks, decide when to move.

A placement of one MoE layer is `expert_at_slot` (int64 [S]): slot s holds logical expert
expert_at_slot[s], and EP rank r owns slots [r * S / ep, (r + 1) * S / ep) (equal slots per rank,
S = number of experts: no replication). The identity is the contiguous split every dispatcher
assumes. parallel/placement_exec.py applies a placement (routing remap, weight and optimizer moves).

`Planner` keeps, per layer, an exponential moving average of per-expert load. It is fed each
step's counts after a `reduce` that sums them over every replica (a collective supplied by the
caller), so every rank holds the same EMA and reaches the same decision without further talk.
Every `interval` steps it packs the predicted loads with greedy longest-processing-time (heaviest
expert first, onto the least-loaded rank that still has a free slot) and migrates a layer only when
the predicted max/mean rank load drops by at least the fraction `margin`:
    new_imbalance <= (1 - margin) * current_imbalance  and  new_imbalance < current_imbalance.
The new bins are matched to ranks so that as many experts as possible stay where they are, and a
staying expert keeps its slot: only experts that change rank cost bytes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch


def rank_loads(load_E: torch.Tensor, expert_at_slot: torch.Tensor, ep: int) -> torch.Tensor:
    """Load per EP rank (float64 [ep]) when slot s holds expert expert_at_slot[s]."""
    return load_E.double()[expert_at_slot].view(ep, -1).sum(1)


def imbalance(rank_load: torch.Tensor) -> float:
    """max / mean of the ranks' loads (1.0 = balanced; also 1.0 when nothing was routed)."""
    mean = float(rank_load.mean())
    return float(rank_load.max()) / mean if mean > 0 else 1.0


def lpt_pack(load_E: torch.Tensor, ep: int) -> list[list[int]]:
    """Greedy LPT into `ep` bins of E / ep experts each: heaviest first onto the lightest bin with a
    free slot (ties: the lower bin, then the lower expert id, so every rank packs identically)."""
    e = load_E.numel()
    per = e // ep
    order = sorted(range(e), key=lambda i: (-float(load_E[i]), i))
    bins: list[list[int]] = [[] for _ in range(ep)]
    totals = [0.0] * ep
    for expert in order:
        open_bins = [b for b in range(ep) if len(bins[b]) < per]
        b = min(open_bins, key=lambda j: (totals[j], j))
        bins[b].append(expert)
        totals[b] += float(load_E[expert])
    return bins


def assign_slots(bins: list[list[int]], old_expert_at_slot: torch.Tensor) -> torch.Tensor:
    """The placement that puts each bin on one rank, chosen (greedily, largest overlap first) to keep
    as many experts on their current rank as possible; a staying expert keeps its slot."""
    ep = len(bins)
    per = old_expert_at_slot.numel() // ep
    old_rank = {int(e): s // per for s, e in enumerate(old_expert_at_slot.tolist())}
    overlap = [[sum(old_rank[x] == r for x in b) for r in range(ep)] for b in bins]
    pairs = sorted(((overlap[b][r], b, r) for b in range(ep) for r in range(ep)), key=lambda t: (-t[0], t[1], t[2]))
    rank_of_bin: dict[int, int] = {}
    taken: set[int] = set()
    for _, b, r in pairs:
        if b not in rank_of_bin and r not in taken:
            rank_of_bin[b] = r
            taken.add(r)
    new = torch.full_like(old_expert_at_slot, -1)
    for b, experts in enumerate(bins):
        r = rank_of_bin[b]
        slots = range(r * per, (r + 1) * per)
        staying = {int(old_expert_at_slot[s]) for s in slots} & set(experts)
        for s in slots:
            if int(old_expert_at_slot[s]) in staying:
                new[s] = old_expert_at_slot[s]
        free = iter(s for s in slots if int(new[s]) < 0)
        for x in sorted(set(experts) - staying):
            new[next(free)] = x
    return new


@dataclass
class Decision:
    """One layer's outcome of a check: the predicted imbalances and, if it migrates, the new table."""
    layer: int
    current: float
    planned: float
    new_expert_at_slot: Optional[torch.Tensor] = None

    @property
    def migrate(self) -> bool:
        return self.new_expert_at_slot is not None


@dataclass
class Planner:
    """Per-layer load EMA and the migrate rule (see the module docstring)."""

    num_layers: int
    num_experts: int
    ep: int
    decay: float = 0.9  # EMA weight of the past: ema = decay * ema + (1 - decay) * load
    interval: int = 5  # check every `interval` observed steps
    margin: float = 0.1  # migrate when predicted max/mean drops by at least this fraction
    reduce: Callable[[torch.Tensor], torch.Tensor] = field(default=lambda t: t)
    ema: Optional[torch.Tensor] = None  # float64 [layers, E]
    steps_seen: int = 0

    def __post_init__(self) -> None:
        if self.num_experts % self.ep:
            raise ValueError(f"Planner: {self.num_experts} experts do not split into ep = {self.ep} equal slot sets")

    def observe(self, loads: list[torch.Tensor]) -> torch.Tensor:
        """Fold one step's per-layer expert counts (this rank's) into the EMA; returns the reduced
        (global) counts [layers, E] of this step."""
        if len(loads) != self.num_layers:
            raise ValueError(f"Planner.observe: {len(loads)} layers of load, expected {self.num_layers}")
        step = self.reduce(torch.stack([x.detach().double().cpu() for x in loads]).clone())
        if self.ema is None:
            self.ema = step.clone()
        else:
            self.ema.mul_(self.decay).add_(step, alpha=1 - self.decay)
        self.steps_seen += 1
        return step

    def due(self) -> bool:
        return self.ema is not None and self.steps_seen % self.interval == 0

    def decide(self, tables: list[torch.Tensor]) -> list[Decision]:
        """For each layer (current `expert_at_slot` in `tables`): plan from the EMA and apply the rule."""
        out = []
        for i, table in enumerate(tables):
            load = self.ema[i]
            current = imbalance(rank_loads(load, table, self.ep))
            new = assign_slots(lpt_pack(load, self.ep), table)
            planned = imbalance(rank_loads(load, new, self.ep))
            moves = not torch.equal(new.view(self.ep, -1).sort(1).values, table.view(self.ep, -1).sort(1).values)
            # Strictly better as well: with margin 0 an equally good plan must not move bytes.
            ok = moves and planned < current and planned <= (1 - self.margin) * current
            out.append(Decision(i, current, planned, new if ok else None))
        return out
