"""Compute time of each operator of a layer, for one micro-batch on one device.

GEMM shapes come from `moe.accounting`'s weight lists (one definition of every matrix), so the FLOPs
charged here are the FLOPs the trainer reports. Each GEMM runs at the roofline
max(FLOPs / (peak * eff(m, k, n)), bytes / memory bandwidth); backward is the data-gradient GEMM
(m, n, k) plus the weight-gradient GEMM (k, m, n). Core attention runs at the GEMM efficiency of its
(S, d, S/2) shape times the profile's attention factor, and its backward costs 2.5 x forward (flash
attention recomputes QK^T). Element-wise work (norms, activations, RoPE, routing, permutation, loss)
is charged by bytes moved at memory bandwidth. Every launched operator adds the profile's fixed
overhead; fused devices (NPU, GPU) launch one kernel per element-wise op, the CPU reference path
several (see `_ELTWISE`).

Tensor parallelism: column-parallel projections split their output, row-parallel ones their input;
MLA's down-projections (wq_a, wkv_a) are replicated on every TP rank (their outputs are small latents
that every rank needs), as in Megatron's MLA. With sequence parallelism (the layout's default) the
work outside TP regions (norms, residuals, router) is split over the TP ranks; without it every TP
rank repeats it on all tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

from moe import accounting as acc
from moe.config import ModelConfig
from simulator.hardware import DTYPE_BYTES, HardwareProfile

# Element-wise ops: (memory passes over the tensor forward, kernels fused, kernels unfused). A pass
# reads or writes the tensor once; backward moves twice the bytes with twice the kernels.
_ELTWISE = {
    "norm": (2, 1, 6),
    "residual": (3, 1, 1),
    "swiglu_act": (3, 1, 2),
    "rope": (2, 1, 8),
    "attn_reshape": (2, 1, 4),  # split/cat of q and k
    "router": (6, 4, 20),  # per token: E fp32 scores through sigmoid/softmax, top-k, normalise, aux loss
    "permute": (2, 2, 6),
    "unpermute": (3, 2, 6),
    "cross_entropy": (4, 2, 5),  # fp32 logits: upcast, log-softmax, gather
    "embedding": (1, 1, 1),
}
CORE_ATTN_BWD_FACTOR = 2.5


@dataclass
class Op:
    """One operator's cost for one micro-batch on one device (seconds), and its model FLOPs."""

    name: str
    fwd: float
    bwd: float
    flops: float  # forward FLOPs executed on this device
    selective: bool = False  # recomputed under the selective (fine-grained) policy


class ComputeModel:
    """Operator costs for one model on one hardware profile (pure functions of shapes)."""

    def __init__(self, model: ModelConfig, hw: HardwareProfile, dtype: str = "bf16",
                 grouped_gemm_per_expert: bool = False):
        self.model, self.hw = model, hw
        self.b = DTYPE_BYTES[dtype]
        self.peak = hw.peak_flops(dtype)
        self.mem_bw = hw.memory_bandwidth_gbps * 1e9
        self.overhead = hw.op_overhead_us * 1e-6
        self.fused = hw.fused
        self.grouped_per_expert = grouped_gemm_per_expert

    # -- primitives -----------------------------------------------------------------------------

    def _gemm_once(self, m: float, k: float, n: float) -> float:
        if m <= 0 or k <= 0 or n <= 0:
            return 0.0
        flops = 2.0 * m * k * n
        t_flops = flops / (self.peak * self.hw.matmul(m, k, n))
        t_mem = self.b * (m * k + k * n + m * n) / self.mem_bw
        return max(t_flops, t_mem)

    def gemm(self, name: str, m: float, k: float, n: float, count: int = 1, kernels: int = 1,
             selective: bool = False) -> Op:
        """`count` equal GEMMs (a grouped GEMM over `count` experts) launched as `kernels` kernels."""
        fwd = count * self._gemm_once(m, k, n) + kernels * self.overhead
        bwd = count * (self._gemm_once(m, n, k) + self._gemm_once(k, m, n)) + 2 * kernels * self.overhead
        return Op(name, fwd, bwd, 2.0 * m * k * n * count, selective)

    def eltwise(self, name: str, kind: str, elems: float, elem_bytes: float | None = None,
                selective: bool = False) -> Op:
        measured = self.hw.op_costs.get(kind)
        if measured:  # calibrated forward + backward cost; backward does about twice the work
            t = measured[0] * 1e-6 + measured[1] * 1e-9 * elems
            return Op(name, t / 3, 2 * t / 3, 0.0, selective)
        passes, k_fused, k_unfused = _ELTWISE[kind]
        kernels = k_fused if self.fused else k_unfused
        t = passes * elems * (elem_bytes or self.b) / self.mem_bw
        return Op(name, t + kernels * self.overhead, 2 * t + 2 * kernels * self.overhead, 0.0, selective)

    def core_attention(self, tokens: float, seq: int, heads: float, d_qk: int, d_v: int, cp: int = 1) -> Op:
        """Causal attention of `tokens` queries over their sequences: S/2 keys per query on average.
        Under context parallelism the rank's share runs as `cp` ring steps, one per key chunk of
        S/cp: the same FLOPs in cp kernels of 1/cp the size (lower efficiency, cp launch costs)."""
        keys = seq / 2
        flops = 2.0 * tokens * heads * keys * (d_qk + d_v)
        eff = self.hw.matmul(seq / cp, d_qk, keys / cp) * self.hw.matmul.attention_factor
        t = flops / (self.peak * eff) + cp * self.overhead
        return Op("core_attention", t, CORE_ATTN_BWD_FACTOR * t, flops)

    # -- layer parts (T = tokens of one micro-batch on this cp rank, before the SP split) --------

    def attention(self, T: float, seq: int, tp: int, sp: int | None = None, cp: int = 1) -> list[Op]:
        """`sp`: ranks sharing the token dimension outside TP regions (tp with sequence parallelism,
        1 without); defaults to tp. `cp`: context-parallel ranks sharing each sequence."""
        cfg, D = self.model, self.model.hidden_size
        t_sp = T / (sp or tp)
        ops = [self.eltwise("attn_norm", "norm", t_sp * D, selective=True)]
        for lin in acc.attention_linears(cfg):
            if lin.name in ("wq_a", "wkv_a"):  # replicated down-projections
                ops.append(self.gemm(lin.name, T, lin.d_in, lin.d_out))
            elif lin.name == "wo":  # row-parallel
                ops.append(self.gemm(lin.name, T, lin.d_in / tp, lin.d_out))
            else:  # column-parallel; MLA's up-projections are recomputed under selective
                ops.append(self.gemm(lin.name, T, lin.d_in, lin.d_out / tp,
                                     selective=lin.name in ("wq_b", "wkv_b")))
        heads = cfg.num_heads / tp
        if cfg.attention == "mla":
            if cfg.q_lora_rank:
                ops.append(self.eltwise("q_norm", "norm", T * cfg.q_lora_rank, selective=True))
            ops.append(self.eltwise("kv_norm", "norm", T * cfg.kv_lora_rank, selective=True))
            rope_elems = T * (heads + 1) * cfg.qk_rope_head_dim
            qk_elems = 2 * T * heads * cfg.qk_head_dim
            d_qk, d_v = cfg.qk_head_dim, cfg.v_head_dim
        else:
            rope_elems = T * (heads + cfg.num_kv_heads / tp) * cfg.head_dim
            qk_elems = 2 * T * heads * cfg.head_dim
            d_qk = d_v = cfg.head_dim
        ops.append(self.eltwise("rope", "rope", rope_elems))
        ops.append(self.eltwise("attn_reshape", "attn_reshape", qk_elems))
        # Under context parallelism this rank holds T = tokens/cp queries of a causally balanced
        # split, so it does 1/cp of the sequence's attention work.
        ops.append(self.core_attention(T, seq, heads, d_qk, d_v, cp))
        if cfg.norm == "sandwich":
            ops.append(self.eltwise("attn_post_norm", "norm", t_sp * D, selective=True))
        ops.append(self.eltwise("attn_residual", "residual", t_sp * D))
        return ops

    def mlp(self, name: str, T: float, ffn: int, tp: int) -> list[Op]:
        D = self.model.hidden_size
        f = ffn / tp
        return [self.gemm(f"{name}_w1", T, D, f), self.gemm(f"{name}_w3", T, D, f),
                self.eltwise(f"{name}_act", "swiglu_act", T * f, selective=True),
                self.gemm(f"{name}_w2", T, f, D)]

    def dense_ffn(self, T: float, tp: int, sp: int | None = None) -> list[Op]:
        D = self.model.hidden_size
        t_sp = T / (sp or tp)
        ops = [self.eltwise("mlp_norm", "norm", t_sp * D, selective=True)]
        ops += self.mlp("mlp", T, self.model.dense_ffn_size, tp)
        if self.model.norm == "sandwich":
            ops.append(self.eltwise("mlp_post_norm", "norm", t_sp * D, selective=True))
        ops.append(self.eltwise("mlp_residual", "residual", t_sp * D))
        return ops

    def moe_ffn(self, T: float, tp: int, ep: int, etp: int, imbalance: float, dispatcher: str = "local",
                nodes: int = 1, sp: int | None = None, t_moe: float | None = None, rows: float | None = None
                ) -> list[Op]:
        """Router, the dispatcher's local permutations, grouped expert GEMMs on the slowest rank,
        shared expert. `nodes`: nodes the EP group spans (hierarchical dispatch); `sp` as in
        `attention`; `t_moe`: tokens this device dispatches and `rows`: expert rows it computes
        (defaults: sequence parallelism, T / tp tokens gathered over the expert-TP group)."""
        cfg, D = self.model, self.model.hidden_size
        t_tok = T / (sp or tp)  # tokens the block's norms and router see on this device
        t_sp = t_moe if t_moe is not None else T / tp
        e_local = cfg.num_experts // ep
        if rows is None:
            rows = t_sp * cfg.top_k * etp * imbalance  # expert rows on the busiest device
        m_e = rows / e_local
        f = cfg.expert_ffn_size / etp
        kern = e_local if self.grouped_per_expert else 1
        copies = t_sp * cfg.top_k * D
        ops = [self.eltwise("moe_norm", "norm", t_tok * D, selective=True),
               self.gemm("router", t_tok, D, cfg.num_experts),
               self.eltwise("routing", "router", t_tok * cfg.num_experts, elem_bytes=4)]
        ops += self._dispatch_ops(dispatcher, ep, nodes, t_sp, copies, rows * D)
        ops += [self.gemm("experts_w1", m_e, D, f, count=e_local, kernels=kern),
                self.gemm("experts_w3", m_e, D, f, count=e_local, kernels=kern),
                self.eltwise("experts_act", "swiglu_act", rows * f, selective=True),
                self.gemm("experts_w2", m_e, f, D, count=e_local, kernels=kern)]
        if cfg.num_shared_experts:
            ops += self.mlp("shared", T, cfg.num_shared_experts * cfg.expert_ffn_size, tp)
        if cfg.norm == "sandwich":
            ops.append(self.eltwise("moe_post_norm", "norm", t_tok * D, selective=True))
        ops.append(self.eltwise("moe_residual", "residual", t_tok * D))
        return ops

    def _dispatch_ops(self, dispatcher: str, ep: int, nodes: int, t_sp: float, copies: float,
                      row_elems: float) -> list[Op]:
        """The dispatcher's local work around its exchanges (as parallel/dispatchers.py does it):
        - local / all-to-all: permute by expert before, weighted unpermute after; with EP the
          receiver also regroups (source, expert) chunks by expert, and undoes that before combine;
        - all-gather: permute the gathered tokens' local copies; unpermute into a partial sum of
          every gathered token (ep x tokens), which the reduce-scatter returns;
        - hierarchical: all-to-all's work plus selecting each token's copy per needed node and
          summing the per-node partial outputs back."""
        if ep <= 1 or dispatcher == "local":
            return [self.eltwise("permute", "permute", copies, selective=True),
                    self.eltwise("unpermute", "unpermute", copies, selective=True)]
        if dispatcher == "allgather":
            return [self.eltwise("permute", "permute", row_elems, selective=True),
                    self.eltwise("unpermute", "unpermute", row_elems + ep * t_sp * self.model.hidden_size,
                                 selective=True)]
        ops = [self.eltwise("permute", "permute", copies, selective=True),
               self.eltwise("regroup", "permute", row_elems, selective=True),
               self.eltwise("ungroup", "permute", row_elems, selective=True),
               self.eltwise("unpermute", "unpermute", copies, selective=True)]
        if dispatcher == "hierarchical" and nodes > 1:
            per_node = t_sp * self.model.hidden_size * nodes  # upper bound: a copy for every node
            ops += [self.eltwise("node_select", "permute", per_node, selective=True),
                    self.eltwise("node_sum", "residual", per_node)]
        return ops

    def embedding(self, T: float, sp: int) -> list[Op]:
        return [self.eltwise("embedding", "embedding", T / sp * self.model.hidden_size)]

    def head(self, T: float, tp: int, sp: int | None = None, vt: int | None = None) -> list[Op]:
        """Final norm, output projection and fp32 cross-entropy over this rank's `vt`-th of the
        vocabulary (vocab-parallel: vt = tp; replicated: 1)."""
        cfg, D = self.model, self.model.hidden_size
        vt = tp if vt is None else vt
        return [self.eltwise("final_norm", "norm", T / (sp or tp) * D),
                self.gemm("head", T, D, cfg.vocab_size / vt),
                self.eltwise("cross_entropy", "cross_entropy", T * cfg.vocab_size / vt, elem_bytes=4)]

    def mtp_extra(self, T: float, tp: int, sp: int | None = None, vt: int | None = None) -> list[Op]:
        """An MTP module's own work besides its transformer block: norms, projection, head pass."""
        D = self.model.hidden_size
        return [self.eltwise("mtp_norms", "norm", 2 * T / (sp or tp) * D),
                self.gemm("mtp_proj", T, 2 * D, D / tp)] + [
            Op("mtp_" + o.name, o.fwd, o.bwd, o.flops) for o in self.head(T, tp, sp, vt)]
