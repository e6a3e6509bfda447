"""Dynamic expert placement for a training run: the planner (parallel/placement.py) and the executor
(parallel/placement_exec.py) applied to a sharded model, step by step.

`ExpertPlacement(model, meshes, ...)` wraps every MoE layer's dispatcher in a `PlacedDispatcher`
(identity placement at first). After each optimizer step the trainer calls `after_step(loads,
optimizer)` with this rank's per-layer expert counts of the step; they are summed over every rank
(pp = 1: the whole world holds every layer; each token's counts appear once per TP rank, which
scales all experts alike and leaves the ratios the planner uses unchanged), folded into the EMA,
and on check steps the layers whose predicted imbalance drops by the margin migrate. Every rank
takes the same decisions from the same sums. The returned metrics say, per layer, max/mean tokens
per EP rank of the step under the contiguous placement ("before") and under the placement the step
ran with ("after"), and the migrations, bytes and seconds of this step.

`state_dict` / `load_state_dict` carry the slot tables and the EMA through checkpoints. A table is
a permutation of the experts over global slots, so it stays valid under another EP size (rank r'
then owns slots [r' * E / ep', ...)); the checkpoint stores expert stacks in slot order.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from moe.layer import MoELayer
from parallel.expert_parallel import EXPERT_WEIGHTS
from parallel.placement import Planner, imbalance, rank_loads
from parallel.placement_exec import PlacedDispatcher, migrate_layers


def _sum_over_world(t: torch.Tensor) -> torch.Tensor:
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


class ExpertPlacement:
    def __init__(self, model: nn.Module, ep_group, interval: int = 5, decay: float = 0.9, margin: float = 0.1):
        self.layers = [m for m in model.modules() if isinstance(m, MoELayer)]
        if not self.layers:
            raise ValueError("expert placement: the model has no MoE layer")
        self.group = ep_group
        self.ep = dist.get_world_size(ep_group)
        num_experts = self.layers[0].cfg.num_experts
        for layer in self.layers:
            if not isinstance(layer.dispatcher, PlacedDispatcher):
                layer.dispatcher = PlacedDispatcher(layer.dispatcher, num_experts)
        self.tables = [torch.arange(num_experts) for _ in self.layers]
        self.planner = Planner(len(self.layers), num_experts, self.ep, decay, interval, margin, reduce=_sum_over_world)
        self.expert_params = {id(getattr(layer.experts, w)) for layer in self.layers for w in EXPERT_WEIGHTS}
        self.migrations = 0  # layers migrated since the start of the run

    def after_step(self, loads: list[torch.Tensor], optimizer) -> dict:
        """Observe this step's per-layer counts; migrate on check steps. Collective: every rank."""
        step = self.planner.observe(loads)
        identity = torch.arange(step.shape[1])
        m = {"placement_imbalance_before": [imbalance(rank_loads(x, identity, self.ep)) for x in step],
             "placement_imbalance_after": [imbalance(rank_loads(x, t, self.ep)) for x, t in zip(step, self.tables)],
             "placement_migrations": 0, "placement_bytes": 0, "placement_time_s": 0.0}
        if not self.planner.due():
            return m
        decisions = self.planner.decide(self.tables)
        m["placement_predicted"] = [[d.current, d.planned] for d in decisions]
        news = [d.new_expert_at_slot for d in decisions]
        if any(n is not None for n in news):
            sent, seconds = migrate_layers(self.layers, self.tables, news, self.group, optimizer, self.expert_params)
            self.tables = [n if n is not None else t for t, n in zip(self.tables, news)]
            done = sum(n is not None for n in news)
            self.migrations += done
            m.update(placement_migrations=done, placement_bytes=sent, placement_time_s=seconds)
        return m

    def state_dict(self) -> dict:
        p = self.planner
        return {"expert_at_slot": torch.stack(self.tables).clone(), "steps_seen": p.steps_seen,
                "ema": None if p.ema is None else p.ema.clone(), "migrations": self.migrations}

    def load_state_dict(self, state: dict) -> None:
        """Restore tables and EMA (the expert stacks must already hold the slots' experts)."""
        tables = state["expert_at_slot"]
        if tables.shape != (len(self.layers), self.planner.num_experts):
            raise ValueError(f"placement state: tables of shape {tuple(tables.shape)}, this model needs "
                             f"{(len(self.layers), self.planner.num_experts)}")
        self.tables = [t.clone() for t in tables]
        for layer, t in zip(self.layers, self.tables):
            layer.dispatcher.set_table(t)
        ema: Optional[torch.Tensor] = state.get("ema")
        self.planner.ema = None if ema is None else ema.clone().double()
        self.planner.steps_seen = int(state["steps_seen"])
        self.migrations = int(state.get("migrations", 0))
