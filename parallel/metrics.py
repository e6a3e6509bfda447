"""Per-step metrics of the expert-parallel runtime for the training log: bytes sent intra- and
inter-node (summed over all ranks), and token copies received per EP rank (summed over the replicas
of each EP rank) with their max/mean imbalance: the load the runtime actually sees, as opposed to
the per-expert load the router reports."""
from __future__ import annotations

import torch

from parallel.comm import CommStats, all_gather_single
from parallel.mesh import Meshes


def step_metrics(stats: CommStats, meshes: Meshes, device: str = "cpu") -> dict:
    """Collective over the world: every rank must call it; then reset the counters."""
    layout = meshes.layout
    mine = torch.tensor([stats.intra_bytes, stats.inter_bytes, stats.tokens_received],
                        dtype=torch.int64, device=device)
    every = mine.new_empty(layout.world * 3)
    all_gather_single(every, mine)
    every = every.view(layout.world, 3).cpu()
    stats.reset()
    # Token copies per EP index, summed over the replicas (expert grid: pp, edp, ep, etp). The etp
    # ranks of one expert all receive the same copies (each for its slice of the FFN): count once.
    grid = torch.from_numpy(layout.expert_grid())
    per_ep = every[:, 2][grid][..., 0].sum(dim=(0, 1))
    mean = float(per_ep.float().mean())
    return {
        "comm_intra_node_bytes": int(every[:, 0].sum()),
        "comm_inter_node_bytes": int(every[:, 1].sum()),
        "tokens_per_ep_rank": per_ep.tolist(),
        "ep_recv_imbalance": float(per_ep.max()) / mean if mean > 0 else 1.0,
    }
