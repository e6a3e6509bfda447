"""Token-to-expert routing: fp32 scores, (group-limited) top-k, selection bias, capacity dropping,
and the auxiliary losses (balance loss at three scopes, z-loss).

The router owns one hook for parallelism: `stats_reducer`, a callable that sums per-expert token
counts over a process group. It is identity on one device; `parallel/` sets it to an all-reduce over
the expert-parallel group to get the "EP-group" balance loss and replica-consistent bias updates.
A second hook, `logits_hook` (None: off), may rewrite the fp32 logits before scoring: the skewed-
routing workload (parallel/skew.py) biases them from outside to make expert popularity uneven.
A third, `token_reducer` (None: off), sums a tensor over the ranks that share the micro-batch's
tokens when this router sees only part of them (sequence parallelism, parallel/sequence_parallel.py):
the balance losses, the z-loss and the expert-load counts then describe the whole micro-batch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from moe.config import ModelConfig


@dataclass
class Routing:
    expert_idx_TK: torch.Tensor  # int64; -1 marks an assignment dropped by capacity
    weights_TK: torch.Tensor  # fp32 combine weights (already renormalised and scaled)
    tokens_per_expert_E: torch.Tensor  # kept assignments per expert (before any reduction)
    aux_loss: torch.Tensor
    z_loss: torch.Tensor


def group_limited_mask(select_TE: torch.Tensor, n_group: int, topk_group: int) -> torch.Tensor:
    """Boolean [T, E]: True for experts inside each token's best `topk_group` groups.

    A group's score is the sum of its two best experts (one when groups hold a single expert), so a
    group with one lucky outlier does not beat a group that is strong overall."""
    t, e = select_TE.shape
    grouped = select_TE.view(t, n_group, e // n_group)
    best = min(2, e // n_group)
    group_score = grouped.topk(best, dim=-1).values.sum(-1)
    keep_groups = group_score.topk(topk_group, dim=-1).indices
    mask = torch.zeros(t, n_group, dtype=torch.bool, device=select_TE.device)
    mask.scatter_(1, keep_groups, True)
    return mask.unsqueeze(-1).expand(t, n_group, e // n_group).reshape(t, e)


def balance_loss(scores_TE: torch.Tensor, expert_idx_TK: torch.Tensor, num_experts: int,
                 counts_E: Optional[torch.Tensor] = None) -> torch.Tensor:
    """sum_i f_i * P_i with f_i = E * count_i / (K * T) and P_i the mean normalised score of expert i.

    `expert_idx_TK` is the routing's selection (no dropped -1 entries). Uniform routing gives 1.
    `counts_E` overrides the local counts (e.g. counts summed over a group,
    with T*K summed likewise: the caller passes counts already scaled to this rank's T*K)."""
    t, k = expert_idx_TK.shape
    if counts_E is None:
        counts_E = torch.bincount(expert_idx_TK.flatten(), minlength=num_experts).float()
    f_E = counts_E.float() * num_experts / (k * t)
    probs_TE = scores_TE / scores_TE.sum(-1, keepdim=True).clamp(min=1e-20)
    p_E = probs_TE.mean(0)
    return (f_E.detach() * p_E).sum()


class Router(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))
        # The selection bias is state, not a parameter: no gradient, updated by `update_bias`.
        self.register_buffer("expert_bias", torch.zeros(cfg.num_experts))
        # Kept-assignment counts accumulated since the last bias update (for aux-loss-free balancing).
        self.register_buffer("load_since_update", torch.zeros(cfg.num_experts), persistent=False)
        self.stats_reducer: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
        self.logits_hook: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
        self.token_reducer: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x_TD: torch.Tensor, seq_len: Optional[int] = None) -> Routing:
        cfg = self.cfg
        logits_TE = F.linear(x_TD.float(), self.weight.float())
        if self.logits_hook is not None:
            logits_TE = self.logits_hook(logits_TE)
        scores_TE = logits_TE.softmax(-1) if cfg.score_func == "softmax" else logits_TE.sigmoid()

        select_TE = scores_TE.detach()
        if cfg.expert_bias:
            select_TE = select_TE + self.expert_bias
        if cfg.n_group > 1:
            select_TE = select_TE.masked_fill(
                ~group_limited_mask(select_TE, cfg.n_group, cfg.topk_group), float("-inf"))
        expert_idx_TK = select_TE.topk(cfg.top_k, dim=-1).indices
        # Combine weights come from the unbiased scores: the bias only steers selection.
        weights_TK = scores_TE.gather(1, expert_idx_TK)
        if cfg.norm_topk_prob:
            weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True).clamp(min=1e-20)
        weights_TK = weights_TK * cfg.routed_scaling_factor

        # The balance loss steers what routing chooses, so it sees the selection before dropping.
        aux = self._aux_loss(scores_TE, expert_idx_TK, seq_len) if cfg.aux_loss_coeff > 0 and self.training \
            else scores_TE.new_zeros(())
        z = self._z_loss(logits_TE) if cfg.z_loss_coeff > 0 and self.training else scores_TE.new_zeros(())
        if cfg.capacity_factor is not None:
            expert_idx_TK = self._drop_over_capacity(expert_idx_TK)

        counts_E = torch.bincount(expert_idx_TK[expert_idx_TK >= 0], minlength=cfg.num_experts)
        if self.token_reducer is not None:
            counts_E = self.token_reducer(counts_E)
        if self.training and cfg.expert_bias:
            self.load_since_update += counts_E.float()
        return Routing(expert_idx_TK, weights_TK, counts_E, aux * cfg.aux_loss_coeff, z * cfg.z_loss_coeff)

    def _drop_over_capacity(self, expert_idx_TK: torch.Tensor) -> torch.Tensor:
        """Keep at most ceil(cf * T * K / E) assignments per expert, earlier tokens first."""
        cfg = self.cfg
        t, k = expert_idx_TK.shape
        capacity = math.ceil(cfg.capacity_factor * t * k / cfg.num_experts)
        one_hot = F.one_hot(expert_idx_TK.flatten(), cfg.num_experts)
        position = (one_hot.cumsum(0) * one_hot).sum(-1).view(t, k)  # 1-based rank within expert
        return expert_idx_TK.masked_fill(position > capacity, -1)

    def _z_loss(self, logits_TE: torch.Tensor) -> torch.Tensor:
        lse2_T = torch.logsumexp(logits_TE, -1) ** 2
        if self.token_reducer is None:
            return lse2_T.mean()
        sums = self.token_reducer(torch.stack([lse2_T.sum(), lse2_T.new_tensor(float(lse2_T.shape[0]))]))
        return sums[0] / sums[1]

    def _aux_loss(self, scores_TE: torch.Tensor, expert_idx_TK: torch.Tensor,
                  seq_len: Optional[int]) -> torch.Tensor:
        cfg = self.cfg
        scope = cfg.aux_loss_scope
        if self.token_reducer is not None:
            return self._aux_loss_shared(scores_TE, expert_idx_TK, seq_len)
        if scope == "sequence" and seq_len is not None:
            per_seq = [balance_loss(s, i, cfg.num_experts)
                       for s, i in zip(scores_TE.split(seq_len), expert_idx_TK.split(seq_len))]
            return torch.stack(per_seq).mean()
        if scope == "group" and self.stats_reducer is not None:
            local = torch.bincount(expert_idx_TK.flatten(), minlength=cfg.num_experts).float()
            total = self.stats_reducer(local.clone())
            # Rescale group counts to this rank's T*K so f_i keeps its meaning (uniform -> 1).
            scaled = total * (local.sum() / total.sum().clamp(min=1))
            return balance_loss(scores_TE, expert_idx_TK, cfg.num_experts, counts_E=scaled)
        return balance_loss(scores_TE, expert_idx_TK, cfg.num_experts)

    def _aux_loss_shared(self, scores_TE: torch.Tensor, expert_idx_TK: torch.Tensor,
                         seq_len: Optional[int]) -> torch.Tensor:
        """`_aux_loss` when this rank holds part of the micro-batch's tokens (part of every
        sequence): each per-scope sum (tokens, scores per expert, selections per expert) is summed
        over the sharing ranks first, then `balance_loss`'s formula applies to the totals."""
        cfg, E = self.cfg, self.cfg.num_experts
        t, k = expert_idx_TK.shape
        per_seq = cfg.aux_loss_scope == "sequence" and seq_len is not None
        rows = t // seq_len if per_seq else 1  # one row of sums per sequence, or one for the micro-batch
        probs_XTE = (scores_TE / scores_TE.sum(-1, keepdim=True).clamp(min=1e-20)).view(rows, -1, E)
        counts_XE = torch.zeros(rows, E, device=scores_TE.device).scatter_add_(
            1, expert_idx_TK.view(rows, -1), torch.ones(rows, t // rows * k, device=scores_TE.device))
        tokens = probs_XTE.new_full((rows, 1), float(t // rows))
        sums = self.token_reducer(torch.cat([probs_XTE.sum(1), counts_XE, tokens], dim=1))
        p_XE, counts_XE, tokens = sums[:, :E], sums[:, E:2 * E].detach(), sums[:, 2 * E:].detach()
        if cfg.aux_loss_scope == "group" and self.stats_reducer is not None:
            total = self.stats_reducer(counts_XE[0].clone())
            counts_XE = (total * (counts_XE.sum() / total.sum().clamp(min=1))).unsqueeze(0)
        f_XE = counts_XE * E / (k * tokens)
        return (f_XE * p_XE / tokens).sum(-1).mean()

    def pending_load(self) -> Optional[torch.Tensor]:
        """The kept-assignment counts gathered since the last bias update (aux-loss-free balancing),
        or None without `expert_bias`. The live buffer: a data-parallel reducer sums it in place
        over replicas before `update_bias` reads it."""
        return self.load_since_update if self.cfg.expert_bias else None

    @torch.no_grad()
    def discard_pending_load(self) -> None:
        """Forget the counts since the last bias update (a skipped step must not steer the bias)."""
        self.load_since_update.zero_()

    @torch.no_grad()
    def update_bias(self) -> None:
        """Aux-loss-free balancing: raise the bias of under-loaded experts, lower over-loaded ones."""
        if not self.cfg.expert_bias:
            return
        load_E = self.load_since_update
        if self.stats_reducer is not None:
            load_E = self.stats_reducer(load_E.clone())
        self.expert_bias += self.cfg.bias_update_speed * torch.sign(load_E.mean() - load_E)
        self.load_since_update.zero_()
