"""Process groups of a layout, built once per run as torch DeviceMeshes over the one world.

Three meshes over the same ranks: the attention side (pp, dp, cp, tp), the MoE side
(pp, edp, ep, etp), and, for the hierarchical dispatcher, the MoE side with ep split by the node
structure (pp, edp, ep_inter, ep_intra, etp). Every rank must call `Meshes.build` (group creation
is collective), after `torch.distributed` is initialised. With pp > 1 it also builds the embedding
groups: the first and the last pipeline rank of each (dp, cp, tp) index, over which the gradient of
the embedding (used on the first stage, copied on the last for MTP or a tied head) is summed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from parallel.layout import Layout


@dataclass
class Meshes:
    layout: Layout
    rank: int
    dense: DeviceMesh
    expert: DeviceMesh
    expert_nodes: Optional[DeviceMesh]  # only built for the hierarchical dispatcher
    embedding_group: Optional[dist.ProcessGroup] = None  # pp > 1: first and last pipeline rank

    @classmethod
    def build(cls, layout: Layout, device_type: str = "cpu", nodes: bool = False) -> "Meshes":
        if not dist.is_initialized():
            raise RuntimeError("Meshes.build: torch.distributed is not initialised (launch/trainer/distributed.py does it)")
        if dist.get_world_size() != layout.world:
            raise RuntimeError(f"Meshes.build: layout is for {layout.world} ranks, the world has {dist.get_world_size()}")
        dense = DeviceMesh(device_type, torch.from_numpy(layout.dense_grid()),
                           mesh_dim_names=("pp", "dp", "cp", "tp"))
        expert = DeviceMesh(device_type, torch.from_numpy(layout.expert_grid()),
                            mesh_dim_names=("pp", "edp", "ep", "etp"))
        expert_nodes = None
        if nodes:
            expert_nodes = DeviceMesh(device_type, torch.from_numpy(layout.expert_node_grid()),
                                      mesh_dim_names=("pp", "edp", "ep_inter", "ep_intra", "etp"))
        embedding = None
        if layout.pp > 2:  # with pp = 2 the pipeline group is that pair
            grid = layout.dense_grid()
            for first, last in zip(grid[0].flatten().tolist(), grid[-1].flatten().tolist()):
                group = dist.new_group([first, last])  # collective: every rank creates every pair
                if dist.get_rank() in (first, last):
                    embedding = group
        elif layout.pp == 2:
            embedding = dense.get_group("pp")
        return cls(layout, dist.get_rank(), dense, expert, expert_nodes, embedding)

    # The groups the runtime uses, by what they are for.
    @property
    def dp_group(self) -> dist.ProcessGroup:
        """Dense-parameter gradients are averaged over it (runtime: cp = 1, so dp alone)."""
        return self.dense.get_group("dp")

    @property
    def pp_group(self) -> dist.ProcessGroup:
        """The pipeline ranks of this (dp, cp, tp) index: activations flow between them."""
        return self.dense.get_group("pp")

    def pp_rank(self) -> int:
        return self.dense.get_local_rank("pp")

    @property
    def ep_group(self) -> dist.ProcessGroup:
        """Tokens are exchanged and balance statistics summed over it."""
        return self.expert.get_group("ep")

    @property
    def edp_group(self) -> dist.ProcessGroup:
        """Replicas of the same experts: expert gradients are averaged over it."""
        return self.expert.get_group("edp")

    @property
    def tp_group(self) -> dist.ProcessGroup:
        """Ranks that split attention heads and dense FFN widths; they hold the same tokens."""
        return self.dense.get_group("tp")

    @property
    def etp_group(self) -> dist.ProcessGroup:
        """Ranks that split each expert's FFN width (the TP group when etp = tp)."""
        return self.expert.get_group("etp")

    @property
    def ep_intra_group(self) -> dist.ProcessGroup:
        assert self.expert_nodes is not None, "built without nodes=True"
        return self.expert_nodes.get_group("ep_intra")

    @property
    def ep_inter_group(self) -> dist.ProcessGroup:
        assert self.expert_nodes is not None, "built without nodes=True"
        return self.expert_nodes.get_group("ep_inter")

    def ep_rank(self) -> int:
        return self.expert.get_local_rank("ep")

    def dp_rank(self) -> int:
        return self.dense.get_local_rank("dp")

    def tp_rank(self) -> int:
        return self.dense.get_local_rank("tp")

    def etp_rank(self) -> int:
        return self.expert.get_local_rank("etp")
