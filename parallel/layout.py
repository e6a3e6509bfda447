"""Rank arithmetic of a parallel layout: which ranks form each group, and which node a rank is on.

Pure Python and numpy, no process group: tests and the simulator use it directly, and `mesh.py`
turns it into process groups.

Rank order: `parallel.rank_order` names the attention-side dims of a pipeline stage innermost
(fastest-changing rank) first; pp is always outermost. The default, Megatron's, is tp-cp-dp: a TP
group is a run of consecutive ranks. The MoE side numbers the same ranks of a stage with the TP dim
moved innermost (so an expert-TP group is the TP group, and TP-extend-EP's EP group holds whole TP
groups), then the data dims in rank order, and splits that into etp (fastest), ep, edp. With the
default order that is a plain etp, ep, edp, pp. An order with tp outermost (dp-cp-tp, cp-dp-tp)
makes EP peers neighbours and the TP group strided instead: for TP 8 x EP 2 on 8-device nodes it
keeps the expert exchange inside a node (`group_strides` gives every group's stride, the simulator
costs those). With etp = 1 an EP group is then a run of consecutive ranks, so "nodes"
(devices_per_node consecutive ranks) split it into an intra-node part (ep_intra) and an inter-node
part (ep_inter) for the hierarchical dispatcher.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import numpy as np

from moe.config import ModelConfig
from parallel.config import DEFAULT_RANK_ORDER, ParallelConfig


class Shard(NamedTuple):
    """One split of a parameter: this rank holds block `index` of `parts` equal blocks along `dim`."""
    dim: int
    index: int
    parts: int


def take_shard(full, shards):
    """The block of tensor `full` that `shards` (applied in order) describe, as a view."""
    for s in shards:
        size = full.shape[s.dim] // s.parts
        full = full.narrow(s.dim, s.index * size, size)
    return full


@dataclass(frozen=True)
class Layout:
    world: int
    tp: int
    cp: int
    pp: int
    dp: int
    ep: int  # ranks the experts of one layer are split over (TP-extend-EP included)
    etp: int
    edp: int
    devices_per_node: int
    order: tuple = tuple(DEFAULT_RANK_ORDER.split("-"))  # attention-side dims, innermost first

    @classmethod
    def build(cls, cfg: ParallelConfig, world: int, model: Optional[ModelConfig] = None) -> "Layout":
        cfg.check_world(world, model)
        dp = cfg.data_parallel(world)
        ep, etp = cfg.expert_parallel, cfg.expert_tp
        edp = dp * cfg.cp * cfg.tp // (ep * etp)
        return cls(world, cfg.tp, cfg.cp, cfg.pp, dp, ep, etp, edp, min(cfg.devices_per_node, world),
                   tuple(cfg.rank_order.split("-")))

    # --- rank grids: grid[i, j, ...] is the global rank at those coordinates ---
    def dense_grid(self) -> np.ndarray:
        """(pp, dp, cp, tp) -> rank."""
        sizes = {"tp": self.tp, "cp": self.cp, "dp": self.dp}
        outer_first = list(reversed(self.order))
        grid = np.arange(self.world).reshape(self.pp, *(sizes[d] for d in outer_first))
        return grid.transpose(0, *(1 + outer_first.index(d) for d in ("dp", "cp", "tp")))

    def expert_grid(self) -> np.ndarray:
        """(pp, edp, ep, etp) -> rank: the stage's ranks with tp innermost, then the data dims in
        rank order (see the module docstring)."""
        data_outer_first = [d for d in reversed(self.order) if d != "tp"]
        stage = self.dense_grid().transpose(0, *(1 + ("dp", "cp").index(d) for d in data_outer_first), 3)
        return np.ascontiguousarray(stage).reshape(self.pp, self.edp, self.ep, self.etp)

    def expert_node_grid(self) -> np.ndarray:
        """The expert grid with ep split into (ep_inter, ep_intra): nodes x ranks of the group per node."""
        intra = self.ep_intra
        return self.expert_grid().reshape(self.pp, self.edp, self.ep // intra, intra, self.etp)

    @property
    def ep_intra(self) -> int:
        """EP ranks per node (the EP group is contiguous when etp = 1)."""
        return min(self.ep, self.devices_per_node) if self.etp == 1 else 1

    @property
    def ep_inter(self) -> int:
        return self.ep // self.ep_intra

    def num_nodes(self) -> int:
        return -(-self.world // self.devices_per_node)

    def node_of(self, rank: int) -> int:
        return rank // self.devices_per_node

    # --- groups: every group of a kind, each a list of global ranks, in a fixed order ---
    @staticmethod
    def _groups(grid: np.ndarray, axis: int) -> list[list[int]]:
        moved = np.moveaxis(grid, axis, -1)
        return [list(map(int, row)) for row in moved.reshape(-1, grid.shape[axis])]

    def dp_groups(self) -> list[list[int]]:
        """Replicas of the dense parameters (cp folded in: its ranks see different tokens too)."""
        g = self.dense_grid()
        merged = np.moveaxis(g, 2, 1).reshape(self.pp, self.dp * self.cp, self.tp)
        return self._groups(merged, 1)

    def ep_groups(self) -> list[list[int]]:
        return self._groups(self.expert_grid(), 2)

    def edp_groups(self) -> list[list[int]]:
        return self._groups(self.expert_grid(), 1)

    def ep_intra_groups(self) -> list[list[int]]:
        return self._groups(self.expert_node_grid(), 3)

    def ep_inter_groups(self) -> list[list[int]]:
        return self._groups(self.expert_node_grid(), 2)

    def group_of(self, groups: list[list[int]], rank: int) -> list[int]:
        for g in groups:
            if rank in g:
                return g
        raise ValueError(f"rank {rank} is in none of the groups {groups}")

    def describe(self) -> str:
        return (f"world {self.world}: dense pp{self.pp} x dp{self.dp} x cp{self.cp} x tp{self.tp}; "
                f"MoE pp{self.pp} x edp{self.edp} x ep{self.ep} x etp{self.etp}; "
                f"{self.num_nodes()} node(s) of {self.devices_per_node} (EP group: {self.ep_inter} node(s) "
                f"x {self.ep_intra} rank(s))")


def group_strides(tp: int, cp: int, dp: int, ep: int, etp: int, order: str = DEFAULT_RANK_ORDER) -> dict[str, int]:
    """Rank distance between neighbours of each kind of group, for a layout `check_world` accepts
    (its rank_order rules keep every group evenly strided): tp, cp, dp, the dense replicas `ddp`
    (dp and cp together), etp, ep, edp and pp. `Layout`'s grids are the definition; tests check this
    closed form against them."""
    dims = order.split("-")
    sizes = {"tp": tp, "cp": cp, "dp": dp}
    stride = {d: math.prod(sizes[x] for x in dims[:i]) for i, d in enumerate(dims)}
    data = min(stride["dp"], stride["cp"]) if dims[0] != "tp" else tp  # dp and cp are adjacent
    if etp == tp:  # expert TP is the TP group; EP peers step through the data dims
        ep_stride, etp_stride = data, stride["tp"]
    else:  # etp divides a tp that is innermost (or tp = 1): the MoE side is a plain etp, ep, edp
        ep_stride, etp_stride = etp, 1
    return {"tp": stride["tp"], "cp": stride["cp"], "dp": stride["dp"], "ddp": data, "etp": etp_stride,
            "ep": ep_stride, "edp": ep_stride * ep, "pp": tp * cp * dp}


def order_changes_groups(tp: int, cp: int, dp: int, order: str, against: str = DEFAULT_RANK_ORDER) -> bool:
    """Whether `order` numbers a stage's ranks into other groups than `against` (by default Megatron's):
    tp-dp-cp only where both cp and dp exceed 1, the tp-outermost orders wherever tp and the data
    ranks (dp * cp) do. Groups of one rank have no stride and do not count. The expert groups follow
    from the dense ones (tp outermost needs etp = tp)."""
    sizes = {"tp": tp, "cp": cp, "dp": dp, "ddp": dp * cp}
    got, ref = group_strides(tp, cp, dp, 1, tp, order), group_strides(tp, cp, dp, 1, tp, against)
    return any(got[k] != ref[k] for k, n in sizes.items() if n > 1)


def noop_placement(pp: int, vpp: int, per_chunk: int, noop: int) -> list[int]:
    """No-op layers per virtual stage. They go where the extra work is: first the chunks of the last
    pipeline rank (output head, MTP), latest chunk first, then those of the first rank (embedding),
    then the remaining stages from the end. Real layers fill the other slots in order."""
    n = pp * vpp
    order = [c * pp + pp - 1 for c in reversed(range(vpp))]
    order += [c * pp for c in reversed(range(vpp)) if c * pp not in order]
    order += [s for s in reversed(range(n)) if s not in order]
    out = [0] * n
    for s in order:
        take = min(per_chunk, noop)
        out[s], noop = take, noop - take
        if not noop:
            break
    return out
