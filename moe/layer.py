"""The MoE feed-forward layer: router, routed experts (grouped GEMM over local experts), shared expert.

Data flow: route -> dispatcher.dispatch (may start communication) -> the shared expert's
up-projections (overlap it) -> wait -> grouped expert FFN -> dispatcher.combine_start -> the shared
expert's activation and down-projection (overlap the return) -> wait -> add the two.

The order is also what hides the exchanges in backward: autograd runs the newest ready node first,
so each half of the shared expert, computed between an exchange's start and its wait, runs its
backward while that exchange's gradient is in flight (parallel/comm.py).

`dispatch_unit = True` (set by parallel/recompute.py's `moe_permute`) computes the same numbers in
another order: the dispatch, its exchange and the routed experts' up-projections as one call,
`dispatch_up`, that can be recomputed as a unit, then the whole shared expert between the
combine's start and its wait. The dispatch exchange then hides nothing (forward, backward, nor its
recomputation).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from moe.config import ModelConfig
from moe.dispatch import LocalDispatcher
from moe.layers import SwiGLU
from moe.router import Router


class GroupedExperts(nn.Module):
    """`num_experts` SwiGLU experts stored as stacked weights so one grouped GEMM serves them all.
    `parallel/` may replace the stacks with this rank's slice (expert parallelism)."""

    def __init__(self, num_experts: int, dim: int, ffn_size: int, kernels):
        super().__init__()
        self.kernels = kernels
        self.w1_EDF = nn.Parameter(torch.empty(num_experts, dim, ffn_size))
        self.w3_EDF = nn.Parameter(torch.empty(num_experts, dim, ffn_size))
        self.w2_EFD = nn.Parameter(torch.empty(num_experts, ffn_size, dim))
        for w in (self.w1_EDF, self.w3_EDF, self.w2_EFD):
            nn.init.normal_(w, std=0.02)

    def forward(self, x_ND: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        return self.act_down(*self.up(x_ND, tokens_per_expert), tokens_per_expert)

    def up(self, x_ND: torch.Tensor, tokens_per_expert: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two up-projections (the grouped GEMMs that save the permuted tokens)."""
        gmm = self.kernels.grouped_mm
        w1, w3 = (w.to(x_ND.dtype) for w in (self.w1_EDF, self.w3_EDF))
        return gmm(x_ND, w1, tokens_per_expert), gmm(x_ND, w3, tokens_per_expert)

    def act_down(self, a_NF: torch.Tensor, b_NF: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
        """The activation and down-projection: a unit that parallel/memory.py may recompute."""
        h_NF = F.silu(a_NF) * b_NF
        return self.kernels.grouped_mm(h_NF, self.w2_EFD.to(h_NF.dtype), tokens_per_expert)


class MoELayer(nn.Module):
    def __init__(self, cfg: ModelConfig, kernels):
        super().__init__()
        self.cfg = cfg
        self.router = Router(cfg)
        self.experts = GroupedExperts(cfg.num_experts, cfg.hidden_size, cfg.expert_ffn_size, kernels)
        self.shared = (SwiGLU(cfg.hidden_size, cfg.num_shared_experts * cfg.expert_ffn_size)
                       if cfg.num_shared_experts > 0 else None)
        self.dispatcher = LocalDispatcher(kernels, cfg.num_experts)
        self.dispatch_unit = False  # compute dispatch + exchange + up-projections as one call (docstring)
        # Last forward's kept assignments per expert (metrics: load imbalance).
        self.register_buffer("last_load", torch.zeros(cfg.num_experts), persistent=False)

    def routing_load(self) -> torch.Tensor:
        """Kept token assignments per expert of the last forward pass (for load metrics)."""
        return self.last_load

    def forward(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, dict]:
        b, s, d = x_BSD.shape
        x_TD = x_BSD.reshape(b * s, d)
        routing = self.router(x_TD, seq_len=s)
        self.last_load = routing.tokens_per_expert_E.detach().float()
        if self.dispatch_unit:
            routed_TD, shared_TD = self._experts_as_unit(x_TD, routing.expert_idx_TK, routing.weights_TK)
        else:
            routed_TD, shared_TD = self._experts_overlapped(x_TD, routing.expert_idx_TK, routing.weights_TK)
        out_TD = routed_TD.to(x_BSD.dtype)
        if shared_TD is not None:
            out_TD = out_TD + shared_TD
        return out_TD.view(b, s, d), {"aux_loss": routing.aux_loss, "z_loss": routing.z_loss}

    def _experts_overlapped(self, x_TD, expert_idx_TK, weights_TK) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(routed experts' combined output, shared expert's output), each half of the shared
        expert between an exchange's start and its wait."""
        pending = self.dispatcher.dispatch(x_TD, expert_idx_TK, weights_TK)
        gate_up = self.shared.gate_up(x_TD) if self.shared is not None else None
        x_ND, tokens_per_expert = pending.wait()
        y_ND = self.experts(x_ND, tokens_per_expert)
        combining = self.dispatcher.combine_start(y_ND, pending)
        shared_TD = self.shared.act_down(*gate_up) if gate_up is not None else None
        return combining.wait(), shared_TD

    def _experts_as_unit(self, x_TD, expert_idx_TK, weights_TK) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The same outputs with dispatch, exchange and up-projections in one call (`dispatch_up`)
        and the whole shared expert between the combine's start and its wait."""
        pending, a_NF, b_NF, tokens_per_expert = self.dispatch_up(x_TD, expert_idx_TK, weights_TK)
        y_ND = self.experts.act_down(a_NF, b_NF, tokens_per_expert)
        combining = self.dispatcher.combine_start(y_ND, pending)
        shared_TD = self.shared.act_down(*self.shared.gate_up(x_TD)) if self.shared is not None else None
        return combining.wait(), shared_TD

    def dispatch_up(self, x_TD, expert_idx_TK, weights_TK) -> tuple:
        """Dispatch (permute, exchange, wait) and the routed experts' up-projections: (the pending
        dispatch that combine needs, both up-projection outputs, tokens per local expert). A unit
        parallel/recompute.py may recompute: the permuted tokens are saved only inside it."""
        pending = self.dispatcher.dispatch(x_TD, expert_idx_TK, weights_TK)
        x_ND, tokens_per_expert = pending.wait()
        a_NF, b_NF = self.experts.up(x_ND, tokens_per_expert)
        return pending, a_NF, b_NF, tokens_per_expert
