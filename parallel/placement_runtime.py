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

Checkpoints: `canonical(optimizer)` moves every expert back to its contiguous slot while a
checkpoint is written (the stacks then mean what they mean without placement), and `meta()` /
`restore()` carry the slot tables and the EMA in the checkpoint's metadata. A table is a
permutation of the experts over global slots, so it stays valid under another EP size (rank r'
then owns slots [r' * E / ep', ...)): `restore` moves the loaded experts to the saved slots.
"""
from __future__ import annotations

import contextlib
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
        m["placement_predicted_current"] = [d.current for d in decisions]  # EMA-predicted max/mean
        m["placement_predicted_planned"] = [d.planned for d in decisions]
        done = sum(d.migrate for d in decisions)
        if done:
            targets = [d.new_expert_at_slot if d.migrate else t for d, t in zip(decisions, self.tables)]
            sent, seconds = self._move_to(targets, optimizer)
            self.migrations += done
            m.update(placement_migrations=done, placement_bytes=sent, placement_time_s=seconds)
        return m

    def _move_to(self, targets: list[torch.Tensor], optimizer) -> tuple[int, float]:
        """Migrate every layer whose table differs from its target; (bytes sent, seconds)."""
        news = [None if torch.equal(t, n) else n for t, n in zip(self.tables, targets)]
        if all(n is None for n in news):
            return 0, 0.0
        sent, seconds = migrate_layers(self.layers, self.tables, news, self.group, optimizer, self.expert_params)
        self.tables = [t.clone() for t in targets]
        return sent, seconds

    @contextlib.contextmanager
    def canonical(self, optimizer):
        """Experts in logical order (the contiguous placement) inside the block, then back: a
        checkpoint written inside holds expert e in row e of every stack, as without placement, so
        any EP size, the Hugging Face export and runs without placement read it unchanged."""
        kept = [t.clone() for t in self.tables]
        self._move_to([torch.arange(t.numel()) for t in kept], optimizer)
        try:
            yield self.meta(kept)
        finally:
            self._move_to(kept, optimizer)

    def meta(self, tables: Optional[list[torch.Tensor]] = None) -> dict:
        """The placement as JSON-able checkpoint metadata (tables, EMA, counters)."""
        p = self.planner
        return {"expert_at_slot": [t.tolist() for t in (tables or self.tables)], "steps_seen": p.steps_seen,
                "ema": None if p.ema is None else p.ema.tolist(), "migrations": self.migrations}

    def restore(self, meta: dict, optimizer) -> None:
        """After loading a canonical checkpoint (identity tables): the saved EMA, counters and tables,
        moving the experts to the saved slots under this run's EP size."""
        tables = torch.tensor(meta["expert_at_slot"], dtype=torch.long)
        if tables.shape != (len(self.layers), self.planner.num_experts):
            raise ValueError(f"checkpoint placement: tables of shape {tuple(tables.shape)}, this model needs "
                             f"{(len(self.layers), self.planner.num_experts)}; resume with the model that wrote it")
        ema = meta.get("ema")
        self.planner.ema = None if ema is None else torch.tensor(ema, dtype=torch.float64)
        self.planner.steps_seen = int(meta["steps_seen"])
        self.migrations = int(meta.get("migrations", 0))
        self._move_to(list(tables), optimizer)


def apply_placement(cfg, model: nn.Module, runtime):
    """The recipe's `placement:` section (parallel/placement_config.py) on a sharded model:
    (ExpertPlacement or None, ZipfSkew or None). The skew is installed whether or not placement is."""
    from parallel.skew import ZipfSkew
    skew = None
    if cfg.skew.enabled:
        num_experts = next(m for m in model.modules() if isinstance(m, MoELayer)).cfg.num_experts
        s = cfg.skew
        skew = ZipfSkew(num_experts, alpha=s.alpha, strength=s.strength, period=s.period, seed=s.seed)
        skew.install(model)
    placement = (ExpertPlacement(model, runtime.meshes.ep_group, cfg.interval, cfg.ema_decay, cfg.margin)
                 if cfg.enabled else None)
    return placement, skew
