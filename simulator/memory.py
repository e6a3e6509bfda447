"""Memory per device: parameters, gradients, optimizer states and activations.

Model states (bytes per parameter): weights in the compute dtype; gradients in fp32 (main grads);
for bf16 training an fp32 master copy; Adam moments 8 bytes. ZeRO-1 shards master weights and
moments over the data-parallel group of each parameter (dp * cp for dense parameters, the
expert-data-parallel group for experts); host offload moves them off the device.

Activations: the tensors each layer saves for backward, listed below per token with the policy
that drops them. `selective` is the fine-grained policy: recompute norms, activation functions,
permutation and MLA's up-projections (so q, k, v are rebuilt from the latents); `full` keeps only
each layer's input. `swap` sends the large swappable tensors (q/k/v, attention output, expert
inputs and hidden states) to host memory, keeping those of `swap_window` layers on the device for
prefetch. With TP, heads shard attention tensors, and with sequence parallelism the TP ranks also
shard the hidden-sized ones; MLA latents are replicated like their projections.
"""
from __future__ import annotations

from dataclasses import dataclass

from moe import accounting as acc
from moe.config import ModelConfig

# (name, elements per token, bytes per element or None for the activation dtype, dropped under
# selective, swappable). "Per token" means per token of the micro-batch on this context-parallel
# rank (T = micro_batch_size * seq_len / cp), so sharding shows up in the element counts.
Saved = tuple[str, float, "float | None", bool, bool]


def attention_saved(cfg: ModelConfig, tp: int, sp: int | None = None) -> list[Saved]:
    """`sp`: ranks sharing the token dimension outside TP regions (tp with sequence parallelism)."""
    D, H, sp = cfg.hidden_size, cfg.num_heads / tp, sp or tp
    out: list[Saved] = [("attn_in", D / sp, None, False, False), ("attn_normed", D / sp, None, True, False)]
    if cfg.attention == "mla":
        if cfg.q_lora_rank:
            out += [("q_latent", cfg.q_lora_rank, None, False, False),
                    ("q_latent_normed", cfg.q_lora_rank, None, True, False)]
        out += [("kv_latent", cfg.kv_lora_rank + cfg.qk_rope_head_dim, None, False, False),
                ("kv_latent_normed", cfg.kv_lora_rank, None, True, False),
                ("q", H * cfg.qk_head_dim, None, True, True), ("k", H * cfg.qk_head_dim, None, True, True),
                ("v", H * cfg.v_head_dim, None, True, True), ("attn_out", H * cfg.v_head_dim, None, False, True)]
    else:
        hkv = cfg.num_kv_heads / tp
        out += [("q", H * cfg.head_dim, None, False, True), ("k", hkv * cfg.head_dim, None, False, True),
                ("v", hkv * cfg.head_dim, None, False, True), ("attn_out", H * cfg.head_dim, None, False, True)]
    out.append(("softmax_lse", H, 4, False, False))
    if cfg.norm == "sandwich":
        out.append(("attn_post_norm_in", D / sp, None, False, False))
    return out


def swiglu_saved(prefix: str, ffn: float, tokens: float = 1.0, swappable: bool = False) -> list[Saved]:
    # w1 and w3 outputs feed the activation's backward; their product is w2's input.
    return [(f"{prefix}_w1_out", tokens * ffn, None, False, swappable),
            (f"{prefix}_w3_out", tokens * ffn, None, False, swappable),
            (f"{prefix}_act_out", tokens * ffn, None, True, swappable)]


def dense_mlp_saved(cfg: ModelConfig, tp: int, sp: int | None = None) -> list[Saved]:
    D, sp = cfg.hidden_size, sp or tp
    out: list[Saved] = [("mlp_in", D / sp, None, False, False), ("mlp_normed", D / sp, None, True, False)]
    out += swiglu_saved("mlp", cfg.dense_ffn_size / tp)
    if cfg.norm == "sandwich":
        out.append(("mlp_post_norm_in", D / sp, None, False, False))
    return out


def moe_saved(cfg: ModelConfig, tp: int, etp: int, imbalance: float, sp: int | None = None,
              home: float | None = None, copies: float | None = None) -> list[Saved]:
    """`home`: share of the tokens this device dispatches and combines; `copies`: expert rows it
    computes per token. Defaults (sequence parallelism): 1/tp and top_k * etp * imbalance / tp on
    the busiest device."""
    D, k, sp = cfg.hidden_size, cfg.top_k, sp or tp
    home = 1 / tp if home is None else home
    copies = k * etp * imbalance / tp if copies is None else copies
    out: list[Saved] = [("moe_in", D / sp, None, False, False), ("moe_normed", D / sp, None, True, False),
                        ("router_scores", cfg.num_experts / sp, 4, False, False),
                        ("expert_in", copies * D, None, False, True)]
    out += swiglu_saved("experts", cfg.expert_ffn_size / etp, copies, swappable=True)
    out.append(("expert_out", k * home * D, None, False, False))
    if cfg.num_shared_experts:
        out += swiglu_saved("shared", cfg.num_shared_experts * cfg.expert_ffn_size / tp)
    if cfg.norm == "sandwich":
        out.append(("moe_post_norm_in", D / sp, None, False, False))
    return out


def unfused_saved(cfg: ModelConfig, kind: str, tp: int, etp: int, imbalance: float, seq_len: int,
                  sp: int | None = None, copies: float | None = None) -> list[Saved]:
    """What an unfused implementation (the CPU reference path) keeps on top of `layer_saved`: each
    RMSNorm its normalised input before the gain, each SwiGLU the SiLU output, and attention without
    a flash kernel the causal softmax probabilities (heads x sequence per token)."""
    D = cfg.hidden_size
    norms = [D / (sp or tp)] * (4 if cfg.norm == "sandwich" else 2)
    if cfg.attention == "mla":
        norms += [cfg.kv_lora_rank] + ([cfg.q_lora_rank] if cfg.q_lora_rank else [])
    out: list[Saved] = [(f"norm{i}_unscaled", n, None, True, False) for i, n in enumerate(norms)]
    out.append(("attn_probs", cfg.num_heads / tp * seq_len, None, False, False))
    if kind == "dense":
        out.append(("mlp_silu", cfg.dense_ffn_size / tp, None, True, False))
    else:
        copies = cfg.top_k * etp * imbalance / tp if copies is None else copies
        out.append(("experts_silu", copies * cfg.expert_ffn_size / etp, None, True, True))
        if cfg.num_shared_experts:
            out.append(("shared_silu", cfg.num_shared_experts * cfg.expert_ffn_size / tp, None, True, False))
    return out


def head_saved_bytes_per_token(cfg: ModelConfig, tp: int, act_bytes: int, fused: bool = True,
                               sp: int | None = None) -> float:
    """Final norm input and output (and, unfused, its unscaled copy), and the fp32 log-probabilities
    the cross-entropy keeps (vocab-parallel)."""
    return (2 if fused else 3) * cfg.hidden_size / (sp or tp) * act_bytes + 4 * cfg.vocab_size / tp


def saved_bytes_per_token(saved: list[Saved], act_bytes: int, policy: str, swap: bool = False) -> tuple[float, float]:
    """(bytes kept on the device, bytes swapped to host) per token under a recompute policy."""
    if policy == "full":
        first = saved[0]  # the layer input
        return first[1] * (first[2] or act_bytes), 0.0
    kept = swapped = 0.0
    for _, elems, eb, drop_sel, swappable in saved:
        if policy == "selective" and drop_sel:
            continue
        nbytes = elems * (eb or act_bytes)
        if swap and swappable:
            swapped += nbytes
        else:
            kept += nbytes
    return kept, swapped


def layer_saved(cfg: ModelConfig, kind: str, tp: int, etp: int, imbalance: float, sp: int | None = None,
                home: float | None = None, copies: float | None = None) -> list[Saved]:
    if kind == "dense":
        return attention_saved(cfg, tp, sp) + dense_mlp_saved(cfg, tp, sp)
    if kind == "moe":
        return attention_saved(cfg, tp, sp) + moe_saved(cfg, tp, etp, imbalance, sp, home, copies)
    raise ValueError(kind)


@dataclass
class StateBytes:
    weights: float
    grads: float
    optimizer: float  # master weights + moments on the device

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer


def stage_params(cfg: ModelConfig, n_dense: int, n_moe: int, first: bool, last: bool, tp: int, ep: int,
                 etp: int, pc: "acc.ParamCounts | None" = None) -> tuple[float, float]:
    """(dense, expert) parameters one device of a pipeline rank holds."""
    pc = pc or acc.param_counts(cfg)
    per = pc.per_layer
    replicated_attn = sum(lin.params for lin in acc.attention_linears(cfg) if lin.name in ("wq_a", "wkv_a"))
    replicated_attn += acc.attention_norm_params(cfg)
    attn = replicated_attn + (per["attention"] - replicated_attn) / tp
    block = attn + per["norms"]
    dense = n_dense * (block + per["dense_mlp"] / tp) + n_moe * (block + per["router"] + per["shared_expert"] / tp)
    expert = n_moe * cfg.num_experts * per["expert"] / (ep * etp)
    if first:
        dense += pc.embedding / tp
    if last:
        dense += pc.output_head / tp + cfg.hidden_size
        if cfg.mtp_layers:
            mtp_block = block + per["router"] + per["shared_expert"] / tp
            own = 3 * cfg.hidden_size + acc.mtp_proj_linear(cfg).params / tp
            dense += cfg.mtp_layers * (own + mtp_block)
            expert += cfg.mtp_layers * cfg.num_experts * per["expert"] / (ep * etp)
    return dense, expert


def state_bytes(dense: float, expert: float, dtype_bytes: int, dense_dp: int, expert_dp: int, zero1: bool,
                offload: bool) -> StateBytes:
    master = 4 if dtype_bytes != 4 else 0
    opt_per_param = master + 8
    if offload:
        opt = 0.0
    elif zero1:
        opt = opt_per_param * (dense / dense_dp + expert / expert_dp)
    else:
        opt = opt_per_param * (dense + expert)
    n = dense + expert
    return StateBytes(weights=dtype_bytes * n, grads=4.0 * n, optimizer=opt)
