"""Parameter and FLOP accounting for the MoE transformer: the one definition of both.

Every weight matrix of the model is listed once, as a `Linear(name, d_in, d_out)`, by the
`*_linears` functions below. Parameter counts and matmul FLOPs are both derived from those lists, so
the two cannot disagree, and the simulator reuses the same lists to get GEMM shapes.

Conventions (used everywhere in the project):
- A matmul of an (m x k) by (k x n) matrix costs 2*m*k*n FLOPs. Per token, a `Linear` costs
  2 * d_in * d_out. Element-wise work (norms, activations, softmax, RoPE, residual adds) is not
  counted: it is a negligible share of the FLOPs (it does cost time; the simulator charges it by
  bytes moved instead).
- Core attention under the causal mask is counted with S/2 keys per query (the average over the
  sequence, as FlashAttention's causal benchmark counts it): QK^T costs 2 * H * (S/2) * d_qk and AV
  costs 2 * H * (S/2) * d_v per token.
- Training FLOPs = 3 x forward (backward = 2 x forward). Recomputation is *not* counted: model FLOPs,
  not hardware FLOPs, are what MFU is defined against.
- The embedding lookup costs no FLOPs; the output head costs 2 * D * vocab per token.

Headline parameter figures (`ParamCounts.total`, `.activated`) exclude the MTP modules, because the
published figures do: DeepSeek-V3's 671B excludes its 14B MTP module (the HF checkpoint with it is
685B), and Pangu Ultra MoE's 718B likewise matches the main model alone. The MTP figures are reported
separately (`mtp_total`, `mtp_activated`, `total_with_mtp`).

"Activated" parameters are those one token's forward pass reads: attention, dense MLPs, router,
top_k routed + all shared experts, norms, the output head, and *one row* (D values) of the input
embedding table, since a lookup reads only the token's own row. Counting the whole input table would
overstate Pangu's 39B by 1.2B; with one row both published figures are matched within 1%.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from moe.config import ModelConfig


@dataclass(frozen=True)
class Linear:
    """A bias-free weight matrix: y = x @ W with W of shape (d_in, d_out)."""

    name: str
    d_in: int
    d_out: int

    @property
    def params(self) -> int:
        return self.d_in * self.d_out

    @property
    def flops_per_token(self) -> int:
        return 2 * self.d_in * self.d_out


# ----------------------------------------------------------------------------------------------
# Weight matrices and norms of each component


def attention_linears(cfg: ModelConfig) -> list[Linear]:
    """Projections of one attention block (MLA or GQA), in the order they run."""
    D, H = cfg.hidden_size, cfg.num_heads
    if cfg.attention == "mla":
        qk = cfg.qk_head_dim
        out = []
        if cfg.q_lora_rank > 0:
            out += [Linear("wq_a", D, cfg.q_lora_rank), Linear("wq_b", cfg.q_lora_rank, H * qk)]
        else:
            out.append(Linear("wq", D, H * qk))
        out += [
            Linear("wkv_a", D, cfg.kv_lora_rank + cfg.qk_rope_head_dim),
            Linear("wkv_b", cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim)),
            Linear("wo", H * cfg.v_head_dim, D),
        ]
        return out
    hd, hkv = cfg.head_dim, cfg.num_kv_heads
    return [Linear("wq", D, H * hd), Linear("wk", D, hkv * hd), Linear("wv", D, hkv * hd),
            Linear("wo", H * hd, D)]


def attention_norm_params(cfg: ModelConfig) -> int:
    """RMSNorm gains inside attention (MLA's q_norm and kv_norm on the latents)."""
    if cfg.attention != "mla":
        return 0
    return cfg.q_lora_rank + cfg.kv_lora_rank


def swiglu_linears(d: int, f: int, prefix: str = "") -> list[Linear]:
    return [Linear(prefix + "w1", d, f), Linear(prefix + "w3", d, f), Linear(prefix + "w2", f, d)]


def dense_mlp_linears(cfg: ModelConfig) -> list[Linear]:
    return swiglu_linears(cfg.hidden_size, cfg.dense_ffn_size)


def expert_linears(cfg: ModelConfig) -> list[Linear]:
    """One routed expert."""
    return swiglu_linears(cfg.hidden_size, cfg.expert_ffn_size)


def shared_expert_linears(cfg: ModelConfig) -> list[Linear]:
    """The shared experts, fused into one SwiGLU of num_shared_experts * expert_ffn_size."""
    if cfg.num_shared_experts == 0:
        return []
    return swiglu_linears(cfg.hidden_size, cfg.num_shared_experts * cfg.expert_ffn_size, "shared_")


def router_linear(cfg: ModelConfig) -> Linear:
    return Linear("gate", cfg.hidden_size, cfg.num_experts)


def mtp_proj_linear(cfg: ModelConfig) -> Linear:
    return Linear("mtp_proj", 2 * cfg.hidden_size, cfg.hidden_size)


def head_linear(cfg: ModelConfig) -> Linear:
    return Linear("head", cfg.hidden_size, cfg.vocab_size)


def layer_norm_params(cfg: ModelConfig) -> int:
    """Block-level RMSNorm gains of one transformer layer (sandwich: 4, pre-norm: 2)."""
    return (4 if cfg.norm == "sandwich" else 2) * cfg.hidden_size


def _sum_params(linears: list[Linear]) -> int:
    return sum(lin.params for lin in linears)


# ----------------------------------------------------------------------------------------------
# Parameter counts


@dataclass
class ParamCounts:
    """Parameter counts. Headline `total`/`activated` exclude MTP (see module docstring)."""

    total: int
    activated: int
    embedding: int  # input embedding table
    output_head: int  # 0 when tied to the embedding
    attention: int  # all layers, incl. MLA latent norms
    dense_mlp: int
    routed_experts: int  # all experts of all MoE layers
    shared_experts: int
    router: int
    norms: int  # block norms of every layer + the final norm
    mtp_total: int
    mtp_activated: int
    per_layer: dict = field(default_factory=dict)  # {"attention", "dense_mlp", "moe_layer", "expert"}

    @property
    def total_with_mtp(self) -> int:
        return self.total + self.mtp_total

    @property
    def activated_with_mtp(self) -> int:
        return self.activated + self.mtp_activated

    @property
    def non_expert(self) -> int:
        """Everything but the routed experts (replicated across expert-parallel ranks)."""
        return self.total - self.routed_experts


def _moe_block_params(cfg: ModelConfig) -> tuple[int, int]:
    """(total, activated) of one MoE feed-forward block: router + routed + shared experts."""
    expert = _sum_params(expert_linears(cfg))
    shared = _sum_params(shared_expert_linears(cfg))
    router = router_linear(cfg).params
    return router + cfg.num_experts * expert + shared, router + cfg.top_k * expert + shared


def param_counts(cfg: ModelConfig) -> ParamCounts:
    D = cfg.hidden_size
    L, n_dense, n_moe = cfg.num_layers, cfg.first_k_dense, cfg.num_moe_layers
    attn_layer = _sum_params(attention_linears(cfg)) + attention_norm_params(cfg)
    dense_layer = _sum_params(dense_mlp_linears(cfg))
    expert = _sum_params(expert_linears(cfg))
    shared = _sum_params(shared_expert_linears(cfg))
    router = router_linear(cfg).params
    moe_total, moe_active = _moe_block_params(cfg)
    layer_norms = layer_norm_params(cfg)

    embedding = cfg.vocab_size * D
    head = 0 if cfg.tie_embeddings else head_linear(cfg).params
    norms = L * layer_norms + D  # + final norm
    total = (embedding + head + norms + L * attn_layer + n_dense * dense_layer + n_moe * moe_total)
    # one embedding row per token, unless the tied head reads the whole table anyway
    emb_head_active = embedding if cfg.tie_embeddings else D + head
    activated = (emb_head_active + norms + L * attn_layer + n_dense * dense_layer + n_moe * moe_active)

    # MTP module: enorm, hnorm, proj, one MoE-type block with its norms, final norm.
    mtp_own = 2 * D + mtp_proj_linear(cfg).params + attn_layer + layer_norms + D
    mtp_total = cfg.mtp_layers * (mtp_own + moe_total)
    mtp_activated = cfg.mtp_layers * (mtp_own + moe_active)
    return ParamCounts(
        total=total, activated=activated, embedding=embedding, output_head=head,
        attention=L * attn_layer, dense_mlp=n_dense * dense_layer,
        routed_experts=n_moe * cfg.num_experts * expert, shared_experts=n_moe * shared,
        router=n_moe * router, norms=norms, mtp_total=mtp_total, mtp_activated=mtp_activated,
        per_layer={"attention": attn_layer, "dense_mlp": dense_layer, "moe_layer": moe_total,
                   "expert": expert, "shared_expert": shared, "router": router, "norms": layer_norms},
    )


# ----------------------------------------------------------------------------------------------
# Forward FLOPs per token, per operator (one layer / one module unless stated)


def attention_proj_flops(cfg: ModelConfig) -> int:
    """Q/K/V/O projections of one attention layer, per token."""
    return sum(lin.flops_per_token for lin in attention_linears(cfg))


def core_attention_flops(cfg: ModelConfig, seq_len: int) -> float:
    """QK^T and AV of one layer per token, causal: each query sees S/2 keys on average."""
    if cfg.attention == "mla":
        d_qk, d_v = cfg.qk_head_dim, cfg.v_head_dim
    else:
        d_qk = d_v = cfg.head_dim
    return 2.0 * cfg.num_heads * (seq_len / 2) * (d_qk + d_v)


def router_flops(cfg: ModelConfig) -> int:
    return router_linear(cfg).flops_per_token


def routed_expert_flops(cfg: ModelConfig) -> int:
    """top_k routed experts of one MoE layer, per token."""
    return cfg.top_k * sum(lin.flops_per_token for lin in expert_linears(cfg))


def shared_expert_flops(cfg: ModelConfig) -> int:
    return sum(lin.flops_per_token for lin in shared_expert_linears(cfg))


def dense_mlp_flops(cfg: ModelConfig) -> int:
    return sum(lin.flops_per_token for lin in dense_mlp_linears(cfg))


def output_head_flops(cfg: ModelConfig) -> int:
    return head_linear(cfg).flops_per_token


def moe_layer_flops(cfg: ModelConfig, seq_len: int) -> float:
    """One MoE-type transformer layer: attention + router + routed and shared experts."""
    return (attention_proj_flops(cfg) + core_attention_flops(cfg, seq_len) + router_flops(cfg)
            + routed_expert_flops(cfg) + shared_expert_flops(cfg))


def dense_layer_flops(cfg: ModelConfig, seq_len: int) -> float:
    return attention_proj_flops(cfg) + core_attention_flops(cfg, seq_len) + dense_mlp_flops(cfg)


def mtp_module_flops(cfg: ModelConfig, seq_len: int) -> float:
    """One MTP module: its projection, its MoE block and another pass through the shared head."""
    return mtp_proj_linear(cfg).flops_per_token + moe_layer_flops(cfg, seq_len) + output_head_flops(cfg)


def forward_flops_breakdown(cfg: ModelConfig, seq_len: int, include_mtp: bool = True) -> dict[str, float]:
    """Forward FLOPs per token of the whole model, by operator kind (summed over layers)."""
    L, n_dense, n_moe = cfg.num_layers, cfg.first_k_dense, cfg.num_moe_layers
    out = {
        "attention_proj": float(L * attention_proj_flops(cfg)),
        "core_attention": L * core_attention_flops(cfg, seq_len),
        "router": float(n_moe * router_flops(cfg)),
        "routed_experts": float(n_moe * routed_expert_flops(cfg)),
        "shared_experts": float(n_moe * shared_expert_flops(cfg)),
        "dense_mlp": float(n_dense * dense_mlp_flops(cfg)),
        "output_head": float(output_head_flops(cfg)),
        "mtp": cfg.mtp_layers * mtp_module_flops(cfg, seq_len) if include_mtp else 0.0,
    }
    return out


def forward_flops_per_token(cfg: ModelConfig, seq_len: int, include_mtp: bool = True) -> float:
    return sum(forward_flops_breakdown(cfg, seq_len, include_mtp).values())


def model_flops_per_token(cfg: ModelConfig, seq_len: int, include_mtp: bool = True) -> float:
    """Training FLOPs per token (forward + backward = 3 x forward), the numerator of MFU."""
    return 3.0 * forward_flops_per_token(cfg, seq_len, include_mtp)


def format_params(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))
