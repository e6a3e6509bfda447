"""Cost of one layer (or the embedding, the output head, an MTP module) for one micro-batch on one
device: compute from `compute.py`, activations from `memory.py`, and the layer's own communication
with its overlap rules:
- TP (sequence-parallel all-gather / reduce-scatter around attention, dense MLP and shared expert):
  exposed, less the `tp_comm_overlap` fraction.
- EP token exchange (dispatch + combine forward, their adjoints backward, again under full
  recompute), message by message as the runtime issues them (`comm.ep_dispatch`, `ep_combine`):
  with the layout's `overlap`, as in the runtime (moe/layer.py), the dispatch overlaps the shared
  expert's up-projections and the combine its activation + down-projection, in forward and (their
  adjoints) in backward; with `fb_overlap` (forward/backward overlap across micro-batches) the
  steady-phase exchange hides behind the paired micro-batch's compute and half of it in warm-up
  and cool-down (`SimOptions.fb_overlap`, or the layout's `fb_overlap`: the runtime's pp = 1 pairing,
  parallel/fb_overlap.py). The busiest expert rank sets the pace (`expert_imbalance` scales its tokens).
- CP (ring exchange of K and V) hides behind core attention.
- Activation swapping hides behind the layer's compute.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from config import ConfigError
from moe.config import ModelConfig
from simulator import comm as C
from parallel.memory_config import MemoryConfig
from simulator import memory as M
from simulator.compute import ComputeModel, Op
from simulator.hardware import DTYPE_BYTES, HardwareProfile
from simulator.layout import Derived, Layout


@dataclass
class SimOptions:
    """Modelling assumptions that are not part of the parallel layout."""

    dtype: Literal["bf16", "fp16", "fp32", "fp8"] = "bf16"
    expert_imbalance: float = 1.0  # max / mean tokens of an expert-parallel rank
    fb_overlap: bool = False  # forward/backward overlap across micro-batches (steady 1F1B)
    tp_comm_overlap: float = 0.0  # fraction of TP collectives hidden behind GEMMs
    overlap_grad_reduce: bool = True
    overlap_param_gather: bool = True
    grad_reduce_dtype: Literal["fp32", "bf16"] = "fp32"
    # the gradients are copied into one flat bucket per group, scaled there and copied back around
    # the reduction (this project's runtime; Megatron reduces contiguous buffers in place)
    grad_bucket_copy: bool = False
    pad_layers: bool = True  # add no-op layers so pp * vpp stages split the depth evenly
    swap_window: int = 2  # layers whose swapped activations stay on the device (prefetch)
    grouped_gemm_per_expert: bool = False  # the expert GEMMs run as a loop of per-expert kernels
    include_mtp_flops: bool = True  # MFU numerator counts the MTP modules (as the trainer does)

    def validate(self, path: str = "") -> None:
        p = f"{path}." if path else ""
        if self.expert_imbalance < 1:
            raise ConfigError(f"{p}expert_imbalance: is max/mean load, so >= 1; got {self.expert_imbalance}")
        if not 0 <= self.tp_comm_overlap <= 1:
            raise ConfigError(f"{p}tp_comm_overlap: a fraction in [0, 1], got {self.tp_comm_overlap}")
        if self.swap_window < 1:
            raise ConfigError(f"{p}swap_window: must be >= 1, got {self.swap_window}")


@dataclass
class PartCost:
    """One layer (or embedding/head part) for one micro-batch on one device, seconds and bytes."""

    f: float = 0.0  # forward compute
    b: float = 0.0  # backward compute, recompute included
    rc: float = 0.0  # the recompute share of b
    tp: float = 0.0  # exposed TP comm, forward (backward is the same)
    tp_fx: float = 0.0  # TP comm in forward only (sequence parallelism: the routers' statistics)
    tp_bx: float = 0.0  # TP comm in backward only (sequence parallelism: the regions' re-gathers)
    ep_f: float = 0.0  # exposed EP exchange without fb overlap
    ep_b: float = 0.0
    ep_f_st: float = 0.0  # exposed EP exchange in the steady phase under fb overlap
    ep_b_st: float = 0.0
    cp: float = 0.0  # exposed CP exchange, forward (backward is twice)
    swap: float = 0.0  # exposed swap time, forward (backward the same)
    act: float = 0.0  # saved activation bytes kept on the device
    act_full: float = 0.0  # activation bytes with no recompute (working set while recomputing)
    swapped: float = 0.0  # bytes swapped to host
    act_whole: float = 0.0  # kept bytes were the layer recomputed whole (`full_layers`)
    ops: list = field(default_factory=list)

    def add(self, o: "PartCost", n: float = 1.0) -> None:
        for name in ("f", "b", "rc", "tp", "tp_fx", "tp_bx", "ep_f", "ep_b", "ep_f_st", "ep_b_st", "cp", "swap", "act",
                     "act_full", "swapped"):
            setattr(self, name, getattr(self, name) + n * getattr(o, name))

    def exposed(self, kind: str, steady: bool) -> float:
        """Exposed communication inside a forward ('F') or backward ('B') op."""
        if kind == "F":
            return self.tp + self.tp_fx + self.cp + self.swap + (self.ep_f_st if steady else self.ep_f)
        return self.tp + self.tp_bx + 2 * self.cp + self.swap + (self.ep_b_st if steady else self.ep_b)

    def fwd(self, steady: bool) -> float:
        return self.f + self.tp + self.tp_fx + self.cp + self.swap + (self.ep_f_st if steady else self.ep_f)

    def bwd(self, steady: bool) -> float:
        return self.b + self.tp + self.tp_bx + 2 * self.cp + self.swap + (self.ep_b_st if steady else self.ep_b)


class LayerCosts:
    """Per-layer costs for one model, profile and option set, cached by the layout fields they use."""

    def __init__(self, model: ModelConfig, hw: HardwareProfile, opt: SimOptions):
        self.model, self.hw, self.opt = model, hw, opt
        self.b = DTYPE_BYTES[opt.dtype]
        self.cm = ComputeModel(model, hw, opt.dtype, opt.grouped_gemm_per_expert)
        self._cache: dict = {}

    def clear_cache(self) -> None:
        self._cache.clear()


    def _ops_cost(self, ops: list[Op], recompute: str) -> PartCost:
        f = sum(o.fwd for o in ops)
        b = sum(o.bwd for o in ops)
        rc = f if recompute == "full" else sum(o.fwd for o in ops if o.selective) if recompute == "selective" else 0.0
        return PartCost(f=f, b=b + rc, rc=rc, ops=ops)

    def _tp_time(self, nbytes: float, tp: int, stride: int, dpn: int, n: float, seq_par: bool = False,
                 gathers: float = 0.0) -> float:
        """Exposed time, one way, of n region sums over the TP group and `gathers` lone all-gathers.
        A region sum is what the runtime issues: an all-gather + reduce-scatter pair under sequence
        parallelism, an all-reduce without. Both move the same bytes, but a profile that measured
        each collective (a CPU calibration) prices them apart: one gloo all-reduce of two ranks cost
        about half an all-gather plus a reduce-scatter here."""
        if tp == 1:
            return 0.0
        gather = C.all_gather(nbytes, tp, stride, dpn).time(self.hw)
        region = (gather + C.reduce_scatter(nbytes, tp, stride, dpn).time(self.hw) if seq_par
                  else C.all_reduce(nbytes, tp, stride, dpn).time(self.hw))
        return (n * region + gathers * gather) * (1 - self.opt.tp_comm_overlap)

    def __call__(self, kind: str, lay: Layout, d: Derived) -> PartCost:
        # strides, not rank_order: under dp-cp-tp the TP and CP strides depend on dp as well
        key = (kind, lay.tp, lay.cp, d.ep, d.etp, lay.micro_batch_size, lay.seq_len, lay.recompute, lay.swap,
               M.policy_key(lay.memory_policy) if lay.memory_policy else None, lay.dispatcher,
               d.devices_per_node, lay.sequence_parallel, lay.overlap, tuple(sorted(d.strides.items())),
               lay.vocab_parallel, lay.fb_overlap)
        hit = self._cache.get(key)
        if hit is None:
            hit = self._cache[key] = self._layer_cost(kind, lay, d)
        return hit

    def _layer_cost(self, kind: str, lay: Layout, d: Derived) -> PartCost:
        """One part's compute, communication and memory. One function (about 60 lines): the parts share
        the token counts and overlap rules set up at its top."""
        cfg, cm, hw, o = self.model, self.cm, self.hw, self.opt
        tp, cp, dpn = lay.tp, lay.cp, d.devices_per_node
        T = lay.micro_batch_size * lay.seq_len / cp
        # ranks sharing the tokens outside TP regions: sequence parallelism splits the layers of the
        # main stack; the embedding, head and MTP modules see whole sequences (parallel/sequence_parallel.py)
        seq_par = lay.sequence_parallel and kind in ("dense", "moe")
        sp = tp if seq_par else 1
        hidden_bytes = T * cfg.hidden_size * self.b  # one gathered activation of the micro-batch
        if kind == "noop":
            return PartCost()
        if kind == "embed":
            # its output is the first layer's input, already counted there; the lookup keeps ids only
            pcost = self._ops_cost(cm.embedding(T, sp), "none")
            # vocab-parallel: the partial lookups summed over TP (replicated: no exchange)
            pcost.tp = self._tp_time(hidden_bytes, lay.vocab_shards, d.strides["tp"], dpn, 1) / 2
            return pcost
        if kind == "head":
            pcost = self._ops_cost(cm.head(T, tp, sp, lay.vocab_shards), "none")
            pcost.tp = self._tp_time(hidden_bytes, lay.vocab_shards, d.strides["tp"], dpn, 1) / 2
            pcost.act = T * M.saved_bytes_per_token(M.head_saved(cfg, tp, hw.fused, sp, lay.vocab_shards), self.b, lay.memory())[0]
            return pcost

        mtp = kind == "mtp"
        moe = kind in ("moe", "mtp")
        # Tokens this device dispatches and expert rows it computes: TP-extend-EP dispatches this TP
        # rank's T/tp tokens (its slice, or under sequence parallelism its own); expert TP dispatches
        # all T tokens of the TP group (gathered first under sequence parallelism) to experts of
        # 1/etp width.
        t_moe = T / tp if lay.tp_extend_ep else T
        rows = t_moe * cfg.top_k * o.expert_imbalance
        attn_ops = cm.attention(T, lay.seq_len, tp, sp, cp)
        nodes = C.group_span(d.ep, d.strides["ep"], dpn)[1]
        ffn_ops = (cm.moe_ffn(T, tp, d.ep, d.etp, o.expert_imbalance, lay.dispatcher, nodes, sp, t_moe, rows)
                   if moe else cm.dense_ffn(T, tp, sp))
        extra = cm.mtp_extra(T, tp, sp, lay.vocab_shards) if mtp else []
        pcost = self._ops_cost(attn_ops + ffn_ops + extra, lay.recompute)
        # TP regions: attention, dense MLP or shared expert (all-gather + reduce-scatter with SP, or
        # an all-reduce each way without). Expert TP sums the routed experts' output
        # over TP (all-reduce; with SP the tokens are all-gathered before the dispatch and the
        # outputs reduce-scattered); without SP, TP-extend-EP gathers its slices back (all-gather).
        sums = 2 if not moe or cfg.num_shared_experts else 1
        gathers = 0.0
        if moe and tp > 1:
            if not lay.tp_extend_ep:
                sums += 1
            elif not seq_par:
                gathers = 1.0  # the outputs gathered back in forward, the input's gradient in backward
        pcost.tp = self._tp_time(hidden_bytes, tp, d.strides["tp"], dpn, sums + (1 if mtp else 0), seq_par, gathers)
        if seq_par and tp > 1:
            # each region's input projections all-gather their input again in backward; a MoE
            # layer's router sums its statistics over TP (one small all-reduce each: counts, and
            # the balance and z-loss sums when those losses are on)
            regions = 2 if not moe or cfg.num_shared_experts else 1
            pcost.tp_bx = regions * C.all_gather(hidden_bytes, tp, d.strides["tp"], dpn).time(hw) * (1 - o.tp_comm_overlap)
            if moe:
                small = 1 + (cfg.aux_loss_coeff > 0) + (cfg.z_loss_coeff > 0)
                pcost.tp_fx = small * C.all_reduce(4 * (2 * cfg.num_experts + 1), tp, d.strides["tp"], dpn).time(hw)
        if cp > 1:
            kv = T * cfg.num_heads / tp * (cfg.qk_head_dim + cfg.v_head_dim if cfg.attention == "mla"
                                           else 2 * cfg.head_dim * cfg.num_kv_heads / cfg.num_heads) * self.b
            # Ring exchange: cp - 1 hand-offs of one chunk's K/V, each hidden behind one step's
            # attention block at best; the first block (the rank's own chunk) hides nothing.
            t_hop = C.all_gather(cp * kv, cp, d.strides["cp"], dpn).time(hw) / (cp - 1)
            block = next(op.fwd for op in attn_ops if op.name == "core_attention") / cp
            pcost.cp = (cp - 1) * max(0.0, t_hop - block)
        if moe and d.ep * d.etp > 1:
            self._ep_costs(pcost, ffn_ops, t_moe, lay, d)
        # activations
        kind_ = "moe" if moe else "dense"
        saved = M.layer_saved(cfg, kind_, tp, d.etp, o.expert_imbalance, sp, t_moe / T, rows / T, hw.fused,
                              lay.seq_len)
        mem = lay.memory()
        kept, swapped = M.saved_bytes_per_token(saved, self.b, mem, whole="layer" in mem.recompute)
        full, _ = M.saved_bytes_per_token(saved, self.b, MemoryConfig())
        pcost.act, pcost.swapped, pcost.act_full = T * kept, T * swapped, T * full
        pcost.act_whole = T * M.saved_bytes_per_token(saved, self.b, mem, whole=True)[0]
        if mtp:  # its input norms and projection, and another pass through the head
            extra = M.mtp_extra_saved(cfg, tp, hw.fused, sp) + M.head_saved(cfg, tp, hw.fused, sp, lay.vocab_shards)
            pcost.act += T * M.saved_bytes_per_token(extra, self.b, mem)[0]
        if swapped:
            t_swap = T * swapped / hw.host_link.bw + hw.host_link.lat
            pcost.swap = max(0.0, t_swap - pcost.f)
        return pcost

    def _ep_costs(self, pcost: PartCost, ffn_ops: list[Op], tokens: float, lay: Layout, d: Derived) -> None:
        cfg, hw, o = self.model, self.hw, self.opt
        dpn = d.devices_per_node
        args = (lay.dispatcher, tokens, cfg.top_k, cfg.hidden_size * self.b, d.ep, d.strides["ep"], dpn,
                o.expert_imbalance, cfg.num_experts)
        dispatch, combine = C.ep_dispatch(*args), C.ep_combine(*args)
        t_d, t_c = C.comm_time(dispatch, hw), C.comm_time(combine, hw)
        up = [op for op in ffn_ops if op.name in ("shared_w1", "shared_w3")]
        down = [op for op in ffn_ops if op.name in ("shared_act", "shared_w2")]
        # The shared expert's up-projections run while the dispatch is in flight, its activation and
        # down-projection while the combine is; backward runs the adjoints in reverse order, each
        # behind the backward of the same half (autograd runs the newest ready node first).
        # Each adjoint is costed as the forward exchange it mirrors.
        if lay.overlap:
            exp_f = max(0.0, t_d - sum(op.fwd for op in up)) + max(0.0, t_c - sum(op.fwd for op in down))
            exp_b = max(0.0, t_c - sum(op.bwd for op in down)) + max(0.0, t_d - sum(op.bwd for op in up))
        else:
            exp_f = exp_b = t_d + t_c
        if lay.recompute == "full":
            exp_b += exp_f
        pcost.ep_f, pcost.ep_b = exp_f, exp_b
        if o.fb_overlap or lay.fb_overlap:  # the option (quoted recipes) or the runtime's setting
            # steady phase: this micro-batch's exchange hides behind the paired op's compute
            pcost.ep_f_st = max(0.0, exp_f - pcost.b)
            pcost.ep_b_st = max(0.0, exp_b - pcost.f)
            pcost.ep_f, pcost.ep_b = 0.5 * exp_f, 0.5 * exp_b
        else:
            pcost.ep_f_st, pcost.ep_b_st = exp_f, exp_b
