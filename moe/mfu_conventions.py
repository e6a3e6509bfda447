"""Training FLOPs per token under the conventions publications use, so an MFU figure can be
compared with a published one. `flops_per_token(cfg, seq_len, convention)` is the one entry point;
the trainer and the simulator report MFU under every convention in `CONVENTIONS`, each named.

- "ultramoe" (ours, the default, `accounting.model_flops_per_token`): every weight matrix listed
  in accounting.py, router included; core attention causal (S/2 keys per query); MTP modules counted.
- "megatron": Megatron-LM's `num_floating_point_operations` (training.py, 2025-26): no router GEMM;
  causal core attention (S/2); MLA's latent norms counted as one FMA per latent element; each MTP
  module counted as one more transformer layer of the last layer's kind, plus its 2D x D projection,
  three D-wide norms and another output head.
- "6n_full_attention" (PaLM, Appendix B, and most MoE papers that quote MFU): 6 x activated
  parameters (the headline figure: MTP excluded, one embedding row) plus core attention over the full
  S x S score matrix (no causal halving): 6 * S * H * (d_qk + d_v) per layer and token.

The three differ by a few percent on large MoE models; the full-attention convention is the largest
at long sequence lengths. Training = 3 x forward in all three; recomputation is never counted.
"""
from __future__ import annotations

from moe import accounting as acc
from moe.config import ModelConfig

CONVENTIONS = ("ultramoe", "megatron", "6n_full_attention")
DESCRIPTIONS = {
    "ultramoe": "all GEMMs incl. router, causal attention S/2, MTP counted",
    "megatron": "Megatron-LM num_floating_point_operations: no router, causal S/2, MTP as extra layers",
    "6n_full_attention": "6 x activated params (no MTP) + full S x S attention (PaLM)",
}


def _head_dims(cfg: ModelConfig) -> tuple[int, int]:
    if cfg.attention == "mla":
        return cfg.qk_head_dim, cfg.v_head_dim
    return cfg.head_dim, cfg.head_dim


def _megatron_attention_fmas(cfg: ModelConfig, seq_len: int) -> float:
    """Fused multiply-adds of one attention layer per token in Megatron's formula."""
    H, D = cfg.num_heads, cfg.hidden_size
    d_qk, d_v = _head_dims(cfg)
    core = seq_len * H * (d_qk + d_v) / 2  # causal: half the score matrix
    if cfg.attention == "mla":
        q = (cfg.q_lora_rank * (D + H * d_qk + 1) if cfg.q_lora_rank > 0 else D * H * d_qk)
        kv = cfg.kv_lora_rank * (D + H * (cfg.qk_nope_head_dim + d_v) + 1) + D * cfg.qk_rope_head_dim
        return q + kv + H * d_v * D + core
    kv_width = cfg.num_kv_heads * cfg.head_dim
    return D * (H * cfg.head_dim + 2 * kv_width) + H * cfg.head_dim * D + core


def megatron_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    D = cfg.hidden_size
    n_moe, n_dense = cfg.num_moe_layers, cfg.first_k_dense
    last_is_moe = cfg.num_moe_layers > 0
    mtp = cfg.mtp_layers
    n_moe_all, n_dense_all = n_moe + (mtp if last_is_moe else 0), n_dense + (0 if last_is_moe else mtp)
    shared_ffn = cfg.num_shared_experts * cfg.expert_ffn_size
    mlp = D * (3 * cfg.dense_ffn_size * n_dense_all
               + 3 * (cfg.expert_ffn_size * cfg.top_k + shared_ffn) * n_moe_all)
    attention = (cfg.num_layers + mtp) * _megatron_attention_fmas(cfg, seq_len)
    mtp_extra = mtp * (3 * D + 2 * D * D)
    logits = D * cfg.vocab_size * (mtp + 1)
    return 3 * 2 * (mlp + attention + mtp_extra + logits)


def full_attention_6n_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    d_qk, d_v = _head_dims(cfg)
    attention = cfg.num_layers * 6.0 * seq_len * cfg.num_heads * (d_qk + d_v)
    return 6.0 * acc.param_counts(cfg).activated + attention


def flops_per_token(cfg: ModelConfig, seq_len: int, convention: str = "ultramoe") -> float:
    """Training FLOPs per token under `convention` (one of CONVENTIONS)."""
    if convention == "ultramoe":
        return acc.model_flops_per_token(cfg, seq_len)
    if convention == "megatron":
        return megatron_flops_per_token(cfg, seq_len)
    if convention == "6n_full_attention":
        return full_attention_6n_flops_per_token(cfg, seq_len)
    raise ValueError(f"unknown FLOP convention {convention!r}; choose one of {', '.join(CONVENTIONS)}")


def mfu_by_convention(cfg: ModelConfig, seq_len: int, tokens_per_s: float, peak_flops_per_s: float,
                      devices: int) -> dict[str, float]:
    """MFU of a run at `tokens_per_s` over `devices` devices of `peak_flops_per_s`, per convention."""
    denom = devices * peak_flops_per_s
    return {c: flops_per_token(cfg, seq_len, c) * tokens_per_s / denom if denom > 0 else 0.0
            for c in CONVENTIONS}
