"""A skewed-routing workload: Zipf-distributed expert popularity that drifts over steps.

Real routing is never balanced, and the hot experts change during training; a tiny model on random
tokens routes almost uniformly. `ZipfSkew` makes the imbalance controllable from outside the model:
it sets each router's `logits_hook` to add a per-expert bias `strength * log p_e(step)`, so the
softmax (or sigmoid) scores lean towards the popular experts, as if the data favoured them. The
bias is a constant with respect to the parameters: gradients flow through the router as before.

Popularity at period k (of `period` steps) ranks the experts by a random permutation drawn from
(seed, layer, k) and gives rank r the Zipf weight 1 / (r + 1) ** alpha. Between two periods the
log-popularity is interpolated linearly, so the hot set drifts smoothly rather than jumping. Every
rank computes the same bias from the same seed and step: no communication.
"""
from __future__ import annotations

import torch
from torch import nn

from moe.layer import MoELayer


def zipf_log_popularity(num_experts: int, alpha: float, order: torch.Tensor) -> torch.Tensor:
    """log p_e where expert order[r] has rank r and p ∝ 1 / (r + 1) ** alpha (float64, sums to 1)."""
    ranks = torch.empty(num_experts, dtype=torch.float64)
    ranks[order] = torch.arange(num_experts, dtype=torch.float64)
    logw = -alpha * torch.log1p(ranks)
    return logw - torch.logsumexp(logw, 0)


class ZipfSkew:
    """Drifting Zipf popularity per MoE layer; `install(model)` hooks the routers, `set_step(s)`
    moves the workload to step s (call it before each step's forward)."""

    def __init__(self, num_experts: int, alpha: float = 1.2, strength: float = 1.0, period: int = 10,
                 seed: int = 0):
        if num_experts < 1:
            raise ValueError(f"ZipfSkew: num_experts must be >= 1, got {num_experts}")
        if alpha < 0:
            raise ValueError(f"ZipfSkew: alpha must be >= 0 (0 is uniform), got {alpha}")
        if period < 1:
            raise ValueError(f"ZipfSkew: period must be >= 1 step, got {period}")
        self.num_experts, self.alpha, self.strength, self.period, self.seed = num_experts, alpha, strength, period, seed
        self.step = 0

    def order(self, layer: int, k: int) -> torch.Tensor:
        """Experts from most to least popular in period k of MoE layer `layer`."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + layer * 7919 + k)
        return torch.randperm(self.num_experts, generator=g)

    def log_popularity(self, layer: int, step: int) -> torch.Tensor:
        k, within = divmod(step, self.period)
        t = within / self.period
        a = zipf_log_popularity(self.num_experts, self.alpha, self.order(layer, k))
        if t == 0:
            return a
        b = zipf_log_popularity(self.num_experts, self.alpha, self.order(layer, k + 1))
        return (1 - t) * a + t * b

    def popularity(self, layer: int, step: int) -> torch.Tensor:
        """The (normalised) popularity each expert has at `step`: what the bias steers towards."""
        p = self.log_popularity(layer, step).exp()
        return p / p.sum()

    def bias(self, layer: int, step: int) -> torch.Tensor:
        return (self.strength * self.log_popularity(layer, step)).float()

    def set_step(self, step: int) -> None:
        self.step = step

    def install(self, model: nn.Module) -> None:
        """Point every MoE layer's router at this workload (layer index = order in the model)."""
        for i, layer in enumerate(m for m in model.modules() if isinstance(m, MoELayer)):
            if layer.cfg.num_experts != self.num_experts:
                raise ValueError(f"ZipfSkew: built for {self.num_experts} experts, the model has "
                                 f"{layer.cfg.num_experts}; pass num_experts={layer.cfg.num_experts}")
            layer.router.logits_hook = self._hook(i)

    def _hook(self, layer: int):
        cache: dict[int, torch.Tensor] = {}

        def add_bias(logits_TE: torch.Tensor) -> torch.Tensor:
            if self.step not in cache:
                cache.clear()
                cache[self.step] = self.bias(layer, self.step)
            return logits_TE + cache[self.step].to(logits_TE.device)
        return add_bias
