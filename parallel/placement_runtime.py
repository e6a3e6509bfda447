"""Dynamic expert placement for a training run: the planner (parallel/placement.py) and the executor
(parallel/placement_exec.py) applied to a sharded model, step by step.

`ExpertPlacement(model, meshes, ...)` wraps every MoE layer's dispatcher in a `PlacedDispatcher`
(identity placement at first). After each optimizer step the trainer calls `after_step(loads,
optimizer)` with the per-layer expert counts of the step; they are summed over every rank holding
the layer (pp = 1: the whole world; with pipeline stages the stage's EP and expert-data-parallel
groups; each token's counts appear once per TP rank, which scales all experts alike and leaves the
ratios the planner uses unchanged), folded into the EMA,
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


def _sum_over(groups):
    """Sum over every rank of a pipeline stage: `groups` None is the whole world (pp = 1);
    else (EP group, expert-data-parallel group), whose product spans the stage up to expert-TP
    copies (equal counts: a common scale the planner's ratios ignore)."""
    def reduce(t: torch.Tensor) -> torch.Tensor:
        for g in groups or [None]:
            if g is None or dist.get_world_size(g) > 1:
                dist.all_reduce(t, op=dist.ReduceOp.SUM, group=g)
        return t
    return reduce


class ExpertPlacement:
    def __init__(self, model: nn.Module, ep_group, interval: int = 5, decay: float = 0.9, margin: float = 0.1,
                 edp_group=None, pp_group=None):
        """`edp_group` and `pp_group` (both or neither): with pipeline stages this rank holds only
        its stages' MoE layers; loads are summed over the stage's ranks, and metrics and checkpoint
        tables are gathered over the pipeline (global MoE layer order: blocks, then MTP modules)."""
        self.layers = [m for m in model.modules() if isinstance(m, MoELayer)]
        if not self.layers:
            raise ValueError("expert placement: the model has no MoE layer")
        # this rank's layers among the whole model's MoE layers (what the trainer's loads list)
        self.index = model.moe_layer_index() if hasattr(model, "moe_layer_index") else list(range(len(self.layers)))
        self.pp_group = pp_group if pp_group is not None and dist.get_world_size(pp_group) > 1 else None
        self.group = ep_group
        self.ep = dist.get_world_size(ep_group)
        num_experts = self.layers[0].cfg.num_experts
        for layer in self.layers:
            if not isinstance(layer.dispatcher, PlacedDispatcher):
                layer.dispatcher = PlacedDispatcher(layer.dispatcher, num_experts)
        self.tables = [torch.arange(num_experts) for _ in self.layers]
        groups = (ep_group, edp_group) if self.pp_group is not None else None
        self.planner = Planner(len(self.layers), num_experts, self.ep, decay, interval, margin, reduce=_sum_over(groups))
        self.expert_params = {id(getattr(layer.experts, w)) for layer in self.layers for w in EXPERT_WEIGHTS}
        self.migrations = 0  # layers migrated since the start of the run

    def _global(self, per_layer: list) -> list:
        """This rank's per-layer values in the whole model's MoE layer order (gathered over pp)."""
        if self.pp_group is None:
            return per_layer
        parts = [None] * dist.get_world_size(self.pp_group)
        dist.all_gather_object(parts, (self.index, per_layer), group=self.pp_group)
        out = {}
        for index, values in parts:
            out.update(zip(index, values))
        return [out[i] for i in sorted(out)]

    def after_step(self, loads: list[torch.Tensor], optimizer) -> dict:
        """Observe this step's per-layer counts (`loads`: every MoE layer of the whole model, the
        trainer's `expert_load`; this rank's layers are picked out); migrate on check steps.
        Collective: every rank."""
        if len(loads) != len(self.layers):
            loads = [loads[i] for i in self.index]
        step = self.planner.observe(loads)
        identity = torch.arange(step.shape[1])
        m = {"placement_imbalance_before": self._global([imbalance(rank_loads(x, identity, self.ep)) for x in step]),
             "placement_imbalance_after": self._global([imbalance(rank_loads(x, t, self.ep))
                                                        for x, t in zip(step, self.tables)]),
             "placement_migrations": 0, "placement_bytes": 0, "placement_time_s": 0.0}
        if not self.planner.due():
            return m
        decisions = self.planner.decide(self.tables)
        m["placement_predicted_current"] = self._global([d.current for d in decisions])  # EMA-predicted max/mean
        m["placement_predicted_planned"] = self._global([d.planned for d in decisions])
        done = sum(d.migrate for d in decisions)
        sent, seconds = self._move_to([d.new_expert_at_slot if d.migrate else t
                                       for d, t in zip(decisions, self.tables)], optimizer) if done else (0, 0.0)
        self.migrations += done
        if self.pp_group is not None:  # every stage's migrations (bytes: this stage's; seconds: the slowest)
            done, sent, seconds = self._pipeline_totals(done, sent, seconds)
        m.update(placement_migrations=done, placement_bytes=sent, placement_time_s=seconds)
        return m

    def _pipeline_totals(self, done: int, sent: int, seconds: float) -> tuple[int, int, float]:
        parts = [None] * dist.get_world_size(self.pp_group)
        dist.all_gather_object(parts, (done, sent, seconds), group=self.pp_group)
        return sum(p[0] for p in parts), sum(p[1] for p in parts), max(p[2] for p in parts)

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
        ema = None if p.ema is None else self._global(p.ema.tolist())
        migrations = self.migrations
        if self.pp_group is not None:
            migrations = self._pipeline_totals(migrations, 0, 0.0)[0]
        return {"expert_at_slot": self._global([t.tolist() for t in (tables or self.tables)]),
                "steps_seen": p.steps_seen, "ema": ema, "migrations": migrations}

    def restore(self, meta: dict, optimizer) -> None:
        """After loading a canonical checkpoint (identity tables): the saved EMA, counters and tables,
        moving the experts to the saved slots under this run's EP size."""
        tables = torch.tensor(meta["expert_at_slot"], dtype=torch.long)
        n_global = max(self.index) + 1 if self.pp_group is not None else len(self.layers)
        if tables.shape[0] < n_global or tables.shape[1:] != (self.planner.num_experts,):
            raise ValueError(f"checkpoint placement: tables of shape {tuple(tables.shape)}, this model needs "
                             f"{(n_global, self.planner.num_experts)}; resume with the model that wrote it")
        mine = torch.tensor(self.index) if tables.shape[0] != len(self.layers) else torch.arange(len(self.layers))
        ema = meta.get("ema")
        self.planner.ema = None if ema is None else torch.tensor(ema, dtype=torch.float64)[mine]
        self.planner.steps_seen = int(meta["steps_seen"])
        # the whole model's count; with stages, pipeline rank 0 carries it (meta() sums the stages)
        first = self.pp_group is None or dist.get_rank(self.pp_group) == 0
        self.migrations = int(meta.get("migrations", 0)) if first else 0
        self._move_to(list(tables[mine]), optimizer)


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
    placement = None
    if cfg.enabled:
        meshes = runtime.meshes
        placement = ExpertPlacement(model, meshes.ep_group, cfg.interval, cfg.ema_decay, cfg.margin,
                                    edp_group=meshes.edp_group, pp_group=meshes.pp_group)
    return placement, skew
