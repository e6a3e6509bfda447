"""Search: parallel layouts for a fixed model, and model hyperparameters within parameter budgets.

Layout search enumerates the cross product of a `LayoutSpace`, pruning early: a TP size that does
not divide the heads skips everything inside it, a (tp, cp, pp) that does not divide the cluster
skips its sub-space, and when the model states alone (weights, gradients, optimizer) overflow the
device no recomputation or micro-batch choice can save the layout, so those are skipped too. Every
layout that passes is costed with the closed-form `Simulator.quick`; the best `rerank` feasible ones
are then re-costed with the event-level timeline and ranked by it.

Model search enumerates a `ModelSpace` (hidden size, layers, routed experts, top-k, expert FFN size,
shared experts), keeps the shapes within the total- and activated-parameter budget, and runs a
layout search for each.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

from moe import accounting as acc
from config import ConfigError
from moe.config import ModelConfig
from simulator.cost import SimOptions, Simulator
from simulator.estimate import Estimate
from simulator.hardware import HardwareProfile
from parallel.config import DEFAULT_RANK_ORDER, DISPATCHERS, RANK_ORDERS
from parallel.layout import order_changes_groups
from simulator.layout import Layout, derive

GB = 2**30


@dataclass
class LayoutSpace:
    tp: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    pp: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32])
    vpp: list[int] = field(default_factory=lambda: [1, 2, 4])
    ep: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64, 128, 256])
    tp_extend_ep: list[bool] = field(default_factory=lambda: [False, True])
    sequence_parallel: list[bool] = field(default_factory=lambda: [True])  # with TP (the runtime's parallel.sequence_parallel)
    cp: list[int] = field(default_factory=lambda: [1, 2])
    zero1: list[bool] = field(default_factory=lambda: [True, False])
    micro_batch_size: list[int] = field(default_factory=lambda: [1, 2, 4])
    recompute: list[str] = field(default_factory=lambda: ["none", "selective", "full"])
    swap: list[bool] = field(default_factory=lambda: [False, True])
    optimizer_offload: list[bool] = field(default_factory=lambda: [False, True])
    dispatcher: list[str] = field(default_factory=lambda: ["alltoall", "hierarchical", "allgather"])
    # parallel.rank_order values; an order is costed only where it changes the groups (tp > 1 with
    # expert TP = TP, and more than one data-parallel rank)
    rank_order: list[str] = field(default_factory=lambda: [DEFAULT_RANK_ORDER, "dp-cp-tp"])
    global_batch_size: int = 3072
    seq_len: int = 4096

    def validate(self, path: str = "") -> None:
        p = f"{path}." if path else ""
        for name in ("tp", "pp", "vpp", "ep", "cp", "micro_batch_size"):
            vals = getattr(self, name)
            if not vals or any(v < 1 for v in vals):
                raise ConfigError(f"{p}{name}: give a non-empty list of sizes >= 1, got {vals}")
        for name, allowed in (("recompute", ("none", "selective", "full")),
                              ("dispatcher", DISPATCHERS), ("rank_order", RANK_ORDERS)):
            bad = [v for v in getattr(self, name) if v not in allowed]
            if bad or not getattr(self, name):
                raise ConfigError(f"{p}{name}: values must be among {', '.join(allowed)}, got {getattr(self, name)}")

    def size(self) -> int:
        n = 1
        for name in ("tp", "pp", "vpp", "ep", "tp_extend_ep", "sequence_parallel", "cp", "zero1", "micro_batch_size", "recompute",
                     "swap", "optimizer_offload", "dispatcher", "rank_order"):
            n *= len(getattr(self, name))
        return n


@dataclass
class SearchResult:
    rows: list[dict]  # every costed layout (closed form), best first
    best: list[Estimate]  # the re-ranked top layouts (timeline), best first
    enumerated: int  # points of the space visited, pruned ones included
    evaluated: int  # layouts costed by the cost model
    feasible: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.evaluated / max(self.seconds, 1e-9)


def _row(e: Estimate) -> dict:
    lay = e.layout
    return {"layout": lay.short(), "tp": lay.tp, "pp": lay.pp, "vpp": lay.vpp, "ep": lay.ep,
            "tp_extend_ep": lay.tp_extend_ep, "sequence_parallel": lay.sequence_parallel, "cp": lay.cp, "dp": e.derived.dp, "zero1": lay.zero1,
            "micro_batch_size": lay.micro_batch_size, "recompute": lay.recompute, "swap": lay.swap,
            "optimizer_offload": lay.optimizer_offload, "dispatcher": lay.dispatcher, "rank_order": lay.rank_order,
            "step_time_s": e.step_time, "pessimistic_step_time_s": e.pessimistic_step_time,
            "tokens_per_s": e.tokens_per_s, "mfu": e.mfu, "peak_memory_gb": e.peak_memory / GB, "fits": e.fits}


def _group_dispatchers(cfg, n_dev: int, space: LayoutSpace, tp, cp, pp, vpp, ep, tpx, sp) -> list[str]:
    """The dispatchers to cost for one (tp, cp, pp, vpp, ep, tp_extend_ep, sp) group; [] when the
    group cannot hold the model (the cheap checks, before any layout is built)."""
    if (cfg.num_heads % tp or n_dev % (tp * cp * pp) or (vpp > 1 and pp == 1)
            or (tpx and tp == 1) or (tp == 1 and sp != space.sequence_parallel[0])):
        return []
    eff_ep = ep * tp if tpx else ep
    if cfg.num_experts % eff_ep:
        return []
    # without expert parallelism every dispatcher is the local one: cost it once
    return ["local"] if eff_ep == 1 else [x for x in space.dispatcher if x != "local"]


def _order_matters(order: str, space: LayoutSpace, tp: int, cp: int, dp: int, ep: int, tp_extend_ep: bool) -> bool:
    """Whether to cost `order`: the space's first order always; another only where it gives other
    groups than the first, check_world allows it (no TP-extend-EP) and it can pay: reordering only
    moves TP, CP and DP peers against the EP ones, so without EP it never wins."""
    first = space.rank_order[0]
    if order == first:
        return True
    if ep == 1 or tp_extend_ep:
        return False
    return order_changes_groups(tp, cp, dp, order, against=first)


def _cost_policies(sim: Simulator, space: LayoutSpace, lay0: Layout, dispatchers: list[str]):
    """Closed-form estimates of `lay0` under every micro-batch size, recompute, swap and dispatcher
    of the space that the layout rules accept."""
    for mbs, rc, swap, disp in itertools.product(space.micro_batch_size, space.recompute, space.swap,
                                                 dispatchers):
        lay = replace(lay0, micro_batch_size=mbs, recompute=rc, swap=swap, dispatcher=disp)
        try:
            d = sim.derive(lay)
        except ConfigError:
            continue
        yield sim.quick(lay, d)


def search_layouts(sim: Simulator, space: LayoutSpace, rerank: int = 10, progress: bool = False,
                   keep_infeasible: bool = True, prune_memory: bool = True,
                   pessimistic: bool = False) -> SearchResult:
    """Cost every layout of `space` (closed form), re-cost the best `rerank` on the timeline.
    `pessimistic`: rank by the slow end of each estimate's error band (simulator/bands.py), so a
    layout whose features the validation found under-predicted ranks lower."""
    cfg, n_dev = sim.model, sim.num_devices
    space.validate("space")
    usable = sim.hw.usable_memory_bytes
    start = time.perf_counter()
    rows: list[tuple[float, Estimate]] = []
    enumerated = evaluated = feasible = 0
    inner = (len(space.zero1) * len(space.optimizer_offload) * len(space.micro_batch_size) * len(space.recompute)
             * len(space.swap) * len(space.dispatcher))
    outer = list(itertools.product(space.tp, space.cp, space.pp, space.vpp, space.ep, space.tp_extend_ep,
                                   space.sequence_parallel, space.rank_order))
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(outer), desc="search", unit="group", dynamic_ncols=True)
    for tp, cp, pp, vpp, ep, tpx, sp, order in outer:
        if bar is not None:
            bar.update(1)
        enumerated += inner
        dispatchers = _group_dispatchers(cfg, n_dev, space, tp, cp, pp, vpp, ep, tpx, sp)
        if not dispatchers or not _order_matters(order, space, tp, cp, n_dev // (tp * cp * pp), ep, tpx):
            continue
        for zero1, offload in itertools.product(space.zero1, space.optimizer_offload):
            lay0 = Layout(tp=tp, pp=pp, vpp=vpp, ep=ep, tp_extend_ep=tpx, sequence_parallel=sp, cp=cp,
                          seq_len=space.seq_len, global_batch_size=space.global_batch_size, zero1=zero1,
                          optimizer_offload=offload, rank_order=order)
            try:
                d0 = derive(cfg, replace(lay0, micro_batch_size=1, global_batch_size=n_dev), n_dev,
                            sim.hw.devices_per_node, sim.opt.pad_layers)
            except ConfigError:
                continue
            if prune_memory and sim.states_peak(lay0, d0) > usable:  # no activation policy can save it
                continue
            for e in _cost_policies(sim, space, lay0, dispatchers):
                evaluated += 1
                if e.fits:
                    feasible += 1
                if e.fits or keep_infeasible:
                    speed = -e.tokens_per_s * (e.step_time / e.pessimistic_step_time if pessimistic else 1.0)
                    rows.append((speed if e.fits else float("inf"), e))
    if bar is not None:
        bar.close()
    rows.sort(key=lambda t: t[0])
    best = [sim.estimate(e.layout) for _, e in rows[:rerank] if e.fits]
    best.sort(key=lambda e: (not e.fits, e.pessimistic_step_time if pessimistic else e.step_time))
    seconds = time.perf_counter() - start
    return SearchResult([_row(e) for _, e in rows], best, enumerated, evaluated, feasible, seconds)


def require_feasible(result: SearchResult, what: str) -> None:
    if not result.best:
        raise ConfigError(f"search: no layout of {what} fits in device memory among {result.evaluated} "
                          f"costed layouts; add devices, allow recompute: full / swap / optimizer_offload, "
                          f"or use a larger-memory hardware profile")


# ----------------------------------------------------------------------------------------------
# model hyperparameter search


@dataclass
class ModelSpace:
    hidden_size: list[int] = field(default_factory=lambda: [6144, 7168, 7680, 8192])
    num_layers: list[int] = field(default_factory=lambda: [54, 61, 64])
    num_experts: list[int] = field(default_factory=lambda: [128, 256, 320])
    top_k: list[int] = field(default_factory=lambda: [8])
    expert_ffn_size: list[int] = field(default_factory=lambda: [1536, 2048, 2560])
    num_shared_experts: list[int] = field(default_factory=lambda: [1])
    # defaults: the neighbourhood of Pangu Ultra MoE (718B / 39B), where shapes compete on equal terms
    total_params_min: float = 600e9
    total_params_max: float = 800e9
    activated_params_min: float = 35e9
    activated_params_max: float = 42e9

    def validate(self, path: str = "") -> None:
        p = f"{path}." if path else ""
        for name in ("hidden_size", "num_layers", "num_experts", "top_k", "expert_ffn_size", "num_shared_experts"):
            if not getattr(self, name):
                raise ConfigError(f"{p}{name}: give at least one value")
        if self.total_params_min > self.total_params_max:
            raise ConfigError(f"{p}total_params_min: exceeds total_params_max")
        if self.activated_params_min > self.activated_params_max:
            raise ConfigError(f"{p}activated_params_min: exceeds activated_params_max")

    def candidates(self, base: ModelConfig) -> list[tuple[ModelConfig, acc.ParamCounts]]:
        """Model shapes within the budgets. Attention heads keep their width: hidden size changes
        the residual stream, not the head count."""
        out, smallest = [], None
        for h, L, E, k, f, s in itertools.product(self.hidden_size, self.num_layers, self.num_experts, self.top_k,
                                                  self.expert_ffn_size, self.num_shared_experts):
            if k > E or L <= base.first_k_dense or E % base.n_group:
                continue
            cfg = replace(base, hidden_size=h, num_layers=L, num_experts=E, top_k=k, expert_ffn_size=f,
                          num_shared_experts=s)
            pc = acc.param_counts(cfg)
            if smallest is None or pc.total < smallest[0]:
                smallest = (pc.total, pc.activated)
            if (self.total_params_min <= pc.total <= self.total_params_max
                    and self.activated_params_min <= pc.activated <= self.activated_params_max):
                out.append((cfg, pc))
        if not out:
            lo = f"; the smallest candidate has {acc.format_params(smallest[0])} total / " \
                 f"{acc.format_params(smallest[1])} activated" if smallest else ""
            raise ConfigError(
                f"model_space: no model in the space satisfies total in [{acc.format_params(self.total_params_min)}, "
                f"{acc.format_params(self.total_params_max)}] and activated in "
                f"[{acc.format_params(self.activated_params_min)}, {acc.format_params(self.activated_params_max)}]"
                f"{lo}; widen the budget or change the hyperparameter lists")
        return out


def search_models(base: ModelConfig, hw: HardwareProfile, num_devices: int, mspace: ModelSpace,
                  lspace: LayoutSpace, options: Optional[SimOptions] = None, progress: bool = False,
                  on_model: Optional[Callable[[dict], None]] = None) -> list[dict]:
    """Best layout of every model shape within budget, ranked by tokens/s (dense-equivalent work per
    token differs between shapes, so the table also lists activated parameters and MFU)."""
    mspace.validate("model_space")
    cands = mspace.candidates(base)
    rows = []
    it = cands
    if progress:
        from tqdm import tqdm
        it = tqdm(cands, desc="models", unit="model", dynamic_ncols=True)
    for cfg, pc in it:
        sim = Simulator(cfg, hw, num_devices, options)
        res = search_layouts(sim, lspace, rerank=1, keep_infeasible=False)
        row = {"hidden_size": cfg.hidden_size, "num_layers": cfg.num_layers, "num_experts": cfg.num_experts,
               "top_k": cfg.top_k, "expert_ffn_size": cfg.expert_ffn_size,
               "num_shared_experts": cfg.num_shared_experts, "total_params_b": pc.total / 1e9,
               "activated_params_b": pc.activated / 1e9, "layouts_costed": res.evaluated}
        if res.best:
            b = res.best[0]
            row.update(best_layout=b.layout.short(), step_time_s=b.step_time, tokens_per_s=b.tokens_per_s,
                       mfu=b.mfu, peak_memory_gb=b.peak_memory / GB)
        else:
            row.update(best_layout="(none fits)", step_time_s=float("inf"), tokens_per_s=0.0, mfu=0.0,
                       peak_memory_gb=float("nan"))
        rows.append(row)
        if on_model:
            on_model(row)
    rows.sort(key=lambda r: -r["tokens_per_s"])
    return rows
