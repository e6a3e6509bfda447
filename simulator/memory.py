"""Memory per device: parameters, gradients, optimizer states and activations.

Model states (bytes per parameter): weights in the compute dtype; gradients in fp32 (main grads);
for bf16 training an fp32 master copy; Adam moments 8 bytes. ZeRO-1 shards master weights and
moments over the data-parallel group of each parameter (dp * cp for dense parameters, the
expert-data-parallel group for experts). Optimizer offload (parallel/offload.py) keeps an fp32
master and both moments of every local parameter on the host, none on the device.

Activations: the tensors each layer saves for backward, listed below per token as the runtime saves
them, each with the recompute kinds whose region drops it and the swap regions that move it to the
host (the kinds of parallel/memory_config.py, so a recipe's `memory:` section is costed kind by
kind). Rules the lists follow, read off the runtime (parallel/recompute.py: non-reentrant
checkpoint over a method): a recomputed region keeps its inputs (checkpoint saves them) and drops
everything saved inside it; its output stays saved by its consumer. So `norm` drops a norm's
fp32 intermediates but not its output, and `swiglu` keeps both up-projection outputs. `layer`
(and `full_layers`) keeps only the layer input. A swap region moves what is saved inside it
(one host copy per saved span, parallel/swap.py; what a consumer outside also saves stays on the
device too). Not counted: RoPE's per-sequence cos/sin tables and a few per-token scalars of the
router (under 1 % here), and the reference norm's fp32 copies of bf16 inputs.
`fused`: the device kernels (flash attention, fused norm and SwiGLU) save only their inputs plus
small statistics; the CPU reference path also keeps each norm's unscaled input, SiLU's output and
the attention probabilities. With TP, heads shard attention tensors, and with sequence
parallelism the TP ranks also shard the hidden-sized ones of the main layers (the head and MTP
modules see whole sequences, parallel/sequence_parallel.py); MLA latents are replicated like their
projections.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

from moe import accounting as acc
from moe.config import ModelConfig
from parallel.memory_config import MemoryConfig


def policy_key(mem: MemoryConfig) -> tuple:
    """What of a `memory:` policy the activation formulas read (a cache key)."""
    return tuple(sorted(mem.recompute)), mem.full_layers, tuple(sorted(mem.swap))


class Saved(NamedTuple):
    """One tensor a layer saves for backward. Elements are per token of the micro-batch on this
    context-parallel rank (T = micro_batch_size * seq_len / cp), so sharding shows in the counts."""

    name: str
    elems: float
    nbytes: Optional[float] = None  # bytes per element; None: the activation dtype
    drop: tuple = ()  # recompute kinds whose region drops it
    swap: tuple = ()  # swap regions that move it to the host
    only: tuple = ()  # saved only as the input of one of these recompute regions (checkpoint keeps it)
    copy: bool = False  # a second save of a tensor another entry keeps: only its host copy counts
    rest: bool = False  # the part of a saved view's storage outside the view: on the device with it, not copied


ATTN, CORE, UP = ("attention",), ("core_attention",), ("mla_up",)


def norm_saved(name: str, width: float, fused: bool, drop: tuple = (), swap: tuple = (),
               share: float = 1.0) -> list[Saved]:
    """An RMSNorm's own saves (its input is its producer's entry): the fp32 1/rms of each of its
    `share` tokens per token and, on the reference path, the normalised input before the gain."""
    out = [Saved(f"{name}_rstd", share, 4, ("norm",) + drop)]  # 4 bytes a token: left out of swap (tiny)
    if not fused:
        out.append(Saved(f"{name}_unscaled", width, None, ("norm",) + drop, swap))
    return out


def core_attention_saved(cfg: ModelConfig, tp: int, fused: bool, seq_len: int, drop: tuple, swap: tuple) -> list[Saved]:
    """The attention kernel's saves. Its inputs q, k and v's storage (MLA: the whole k_nope|v
    up-projection output) are what `core_attention` recompute keeps; the flash kernel saves exactly
    those plus its output and log-sum-exp, the reference path copies of q, k, v and the softmax
    probabilities (heads x sequence per token)."""
    H = cfg.num_heads / tp
    mla = cfg.attention == "mla"
    qk, v = (H * cfg.qk_head_dim, H * cfg.v_head_dim) if mla else (H * cfg.head_dim, H * cfg.head_dim)
    inner, region = drop + CORE, swap + CORE
    inputs = [Saved("q", qk, None, drop, region), Saved("k", qk, None, drop, region),
              Saved("v", v, None, drop, region)]
    if mla:  # v is a view of the up-projection's output; its k_nope half shares the storage
        inputs.append(Saved("v_storage_k_nope", H * cfg.qk_nope_head_dim, None, drop, region, rest=True))
    if fused:
        return inputs + [Saved("attn_kernel_out", v, None, inner, region),
                         Saved("softmax_lse", H, 4, inner, region)]
    return [s._replace(only=CORE, swap=swap) for s in inputs] + [
        Saved("q_sdpa", qk, None, inner, region), Saved("k_sdpa", qk, None, inner, region),
        Saved("attn_probs", H * seq_len, None, inner, region), Saved("v_sdpa", v, None, inner, region)]


def attention_saved(cfg: ModelConfig, tp: int, sp: Optional[int] = None, fused: bool = True,
                    seq_len: int = 0) -> list[Saved]:
    """`sp`: ranks sharing the token dimension outside TP regions (tp with sequence parallelism)."""
    D, H, sp = cfg.hidden_size, cfg.num_heads / tp, sp or tp
    out = [Saved("attn_in", D / sp)] + norm_saved("attn_norm", D / sp, fused, share=1 / sp)
    # the projections' input; under sequence parallelism their saved part of it stays on the device
    # (parallel/sequence_parallel.py re-gathers it in backward) whatever the swap regions
    out.append(Saved("attn_normed", D / sp, swap=ATTN if sp == 1 else ()))
    if cfg.attention == "mla":
        if cfg.q_lora_rank:  # q_norm runs inside the up-projection region, so mla_up drops its saves
            out += [Saved("q_latent", cfg.q_lora_rank, swap=ATTN)]
            out += norm_saved("q_norm", cfg.q_lora_rank, fused, UP, ATTN)
            out.append(Saved("q_latent_normed", cfg.q_lora_rank, None, UP, ATTN))
        # kv_latent and k_rope are views of one projection output; k_rope itself is saved only as
        # the up-projection region's input (and copied to host then), else it rides along
        rope = cfg.qk_rope_head_dim
        out += [Saved("kv_latent", cfg.kv_lora_rank, swap=ATTN), Saved("k_rope", rope, swap=ATTN, rest=True),
                Saved("k_rope_input", rope, None, UP, ATTN, only=UP, copy=True)]
        out += norm_saved("kv_norm", cfg.kv_lora_rank, fused, UP, ATTN)
        out.append(Saved("kv_latent_normed", cfg.kv_lora_rank, None, UP, ATTN))
        out += core_attention_saved(cfg, tp, fused, seq_len, UP, ATTN)
        v_out = H * cfg.v_head_dim
    else:
        out += core_attention_saved(cfg, tp, fused, seq_len, (), ATTN)
        v_out = H * cfg.head_dim
    out.append(Saved("attn_out", v_out, swap=ATTN))  # the output projection's input
    return out + sandwich_post(cfg, "attn", sp, fused)


def swiglu_saved(prefix: str, ffn: float, tokens: float, fused: bool, drop: tuple = (),
                 swap: tuple = ()) -> list[Saved]:
    """w1 and w3 outputs (the activation region's inputs); SiLU's output (reference path) and the
    gated product (w2's input), which `swiglu` recompute drops."""
    act = drop + ("swiglu",)
    out = [Saved(f"{prefix}_w1_out", tokens * ffn, None, drop, swap),
           Saved(f"{prefix}_w3_out", tokens * ffn, None, drop, swap)]
    if not fused:
        out.append(Saved(f"{prefix}_silu", tokens * ffn, None, act, swap))
    return out + [Saved(f"{prefix}_act_out", tokens * ffn, None, act, swap)]


def sandwich_post(cfg: ModelConfig, name: str, sp: int, fused: bool) -> list[Saved]:
    if cfg.norm != "sandwich":
        return []
    return [Saved(f"{name}_post_norm_in", cfg.hidden_size / sp)] + norm_saved(f"{name}_post_norm",
                                                                              cfg.hidden_size / sp, fused, share=1 / sp)


def dense_mlp_saved(cfg: ModelConfig, tp: int, sp: Optional[int] = None, fused: bool = True) -> list[Saved]:
    D, sp = cfg.hidden_size, sp or tp
    out = [Saved("mlp_in", D / sp)] + norm_saved("mlp_norm", D / sp, fused, share=1 / sp)
    out.append(Saved("mlp_normed", D / sp, swap=("mlp",) if sp == 1 else ()))
    out += swiglu_saved("mlp", cfg.dense_ffn_size / tp, 1.0, fused, swap=("mlp",))
    return out + sandwich_post(cfg, "mlp", sp, fused)


def moe_saved(cfg: ModelConfig, tp: int, etp: int, imbalance: float, sp: Optional[int] = None,
              home: Optional[float] = None, copies: Optional[float] = None, fused: bool = True) -> list[Saved]:
    """`home`: share of the tokens this device dispatches and combines; `copies`: expert rows it
    computes per token. Defaults (sequence parallelism): 1/tp and top_k * etp * imbalance / tp on
    the busiest device."""
    D, k, sp = cfg.hidden_size, cfg.top_k, sp or tp
    home = 1 / tp if home is None else home
    copies = k * etp * imbalance / tp if copies is None else copies
    E = ("expert_ffn",)
    out = [Saved("moe_in", D / sp)] + norm_saved("moe_norm", D / sp, fused, share=1 / sp)
    out += [Saved("moe_normed", D / sp),  # the router's input (and the shared expert's: swapped as a copy)
            Saved("router_scores", cfg.num_experts / sp, 4), Saved("router_topk", k / sp, 8),
            Saved("router_weights", k / sp, 4),
            Saved("permute_index", k * home, 8),  # token of each expert row (the gather's index; the unpermute's too)
            Saved("expert_in", copies * D, None, ("moe_permute",), E)]  # the grouped GEMM's input (expert_ffn keeps it)
    out += swiglu_saved("experts", cfg.expert_ffn_size / etp, copies, fused, E, E)
    out += [Saved("expert_out", k * home * D),  # rows back home, saved by the weighted unpermute
            Saved("unpermute_index", k * home, 8), Saved("unpermute_weights", k * home, 4)]
    if cfg.num_shared_experts:
        out.append(Saved("shared_in", D / sp, swap=("mlp",) if sp == 1 else (), copy=True))
        out += swiglu_saved("shared", cfg.num_shared_experts * cfg.expert_ffn_size / tp, 1.0, fused, swap=("mlp",))
    return out + sandwich_post(cfg, "moe", sp, fused)


def layer_saved(cfg: ModelConfig, kind: str, tp: int, etp: int, imbalance: float, sp: Optional[int] = None,
                home: Optional[float] = None, copies: Optional[float] = None, fused: bool = True,
                seq_len: int = 0) -> list[Saved]:
    """One transformer layer's saves; its first entry is the layer input (all `layer` keeps)."""
    attn = attention_saved(cfg, tp, sp, fused, seq_len)
    if kind == "dense":
        return attn + dense_mlp_saved(cfg, tp, sp, fused)
    if kind == "moe":
        return attn + moe_saved(cfg, tp, etp, imbalance, sp, home, copies, fused)
    raise ValueError(kind)


def head_saved(cfg: ModelConfig, tp: int, fused: bool = True, sp: Optional[int] = None,
               vt: Optional[int] = None) -> list[Saved]:
    """The final norm (its input is the last layer's output, counted here), the head's input, the
    fp32 exponentials the cross-entropy keeps over this rank's `vt`-th of the vocabulary
    (vocab-parallel: vt = tp) and the labels."""
    D, sp, vt = cfg.hidden_size, sp or tp, vt or tp
    return ([Saved("final_norm_in", D / sp)] + norm_saved("final_norm", D / sp, fused, share=1 / sp)
            + [Saved("head_in", D / sp), Saved("log_probs", cfg.vocab_size / vt, 4), Saved("labels", 1 / sp, 8)])


def mtp_extra_saved(cfg: ModelConfig, tp: int, fused: bool = True, sp: Optional[int] = None) -> list[Saved]:
    """An MTP module outside its transformer block: the two input norms (their inputs are the
    main model's hidden states and the embeddings, counted there) and the projection's input, the
    concatenation of both normed halves."""
    D, sp = cfg.hidden_size, sp or tp
    return (norm_saved("mtp_hidden_norm", D / sp, fused, share=1 / sp) + norm_saved("mtp_embed_norm", D / sp, fused, share=1 / sp)
            + [Saved("mtp_proj_in", 2 * D / sp)])


def saved_bytes_per_token(saved: list[Saved], act_bytes: int, mem: MemoryConfig,
                          whole: bool = False) -> tuple[float, float]:
    """(bytes kept on the device, bytes swapped to host) per token under the `memory:` policy `mem`.
    `whole`: the layer is recomputed whole (recompute `layer`, or one of the first `full_layers`),
    which keeps its input, the first entry, alone (the head and MTP norms are outside any layer)."""
    if whole:
        first = saved[0]
        return first.elems * (first.nbytes or act_bytes), 0.0
    on, swap = set(mem.recompute), set(mem.swap)
    kept = swapped = 0.0
    for s in saved:
        if on.intersection(s.drop) or (s.only and not on.intersection(s.only)):
            continue
        nbytes = s.elems * (s.nbytes or act_bytes)
        if swap.intersection(s.swap):
            swapped += 0.0 if s.rest else nbytes
        elif not s.copy:
            kept += nbytes
    return kept, swapped


@dataclass
class StateBytes:
    weights: float
    grads: float
    optimizer: float  # master weights + moments on the device
    optimizer_host: float = 0.0  # the same states under optimizer offload (fp32 masters + moments)

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer


def stage_params(cfg: ModelConfig, n_dense: int, n_moe: int, first: bool, last: bool, tp: int, ep: int,
                 etp: int, pc: "acc.ParamCounts | None" = None, vt: Optional[int] = None) -> tuple[float, float]:
    """(dense, expert) parameters one device of a pipeline rank holds; `vt`: the ranks the
    embedding and head are split over (vocab-parallel: tp, the default)."""
    vt = vt or tp
    pc = pc or acc.param_counts(cfg)
    per = pc.per_layer
    replicated_attn = sum(lin.params for lin in acc.attention_linears(cfg) if lin.name in ("wq_a", "wkv_a"))
    replicated_attn += acc.attention_norm_params(cfg)
    attn = replicated_attn + (per["attention"] - replicated_attn) / tp
    block = attn + per["norms"]
    dense = n_dense * (block + per["dense_mlp"] / tp) + n_moe * (block + per["router"] + per["shared_expert"] / tp)
    expert = n_moe * cfg.num_experts * per["expert"] / (ep * etp)
    if first:
        dense += pc.embedding / vt
    if last:
        dense += pc.output_head / vt + cfg.hidden_size
        if cfg.mtp_layers:
            mtp_block = block + per["router"] + per["shared_expert"] / tp
            own = 3 * cfg.hidden_size + acc.mtp_proj_linear(cfg).params / tp
            dense += cfg.mtp_layers * (own + mtp_block)
            expert += cfg.mtp_layers * cfg.num_experts * per["expert"] / (ep * etp)
    return dense, expert


def state_bytes(dense: float, expert: float, dtype_bytes: int, dense_dp: int, expert_dp: int, zero1: bool,
                offload: bool) -> StateBytes:
    # Offload keeps an fp32 master of every local parameter on the host even in fp32 training
    # (the host step updates it, then copies it back): 12 bytes a parameter there, none here.
    local = dense / dense_dp + expert / expert_dp if zero1 else dense + expert
    on_device = (4 if dtype_bytes != 4 else 0) + 8
    n = dense + expert
    return StateBytes(weights=dtype_bytes * n, grads=4.0 * n, optimizer=0.0 if offload else on_device * local,
                      optimizer_host=12.0 * local if offload else 0.0)
