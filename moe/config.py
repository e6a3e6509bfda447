"""The model shape: `ModelConfig`, its validation, and loading it from YAML."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from config import ConfigError, from_dict, load_yaml, require, resolve_file


@dataclass
class ModelConfig:
    """Shape and behaviour of the MoE transformer. Defaults give a tiny CPU model."""

    vocab_size: int = 256
    hidden_size: int = 64
    num_layers: int = 4
    max_seq_len: int = 256
    # attention
    attention: Literal["mla", "gqa"] = "mla"
    num_heads: int = 4
    num_kv_heads: int = 4  # GQA only
    head_dim: int = 16  # GQA only
    q_lora_rank: int = 32  # MLA; 0 means queries are projected directly
    kv_lora_rank: int = 32
    qk_nope_head_dim: int = 16
    qk_rope_head_dim: int = 8
    v_head_dim: int = 16
    rope_theta: float = 10000.0
    # feed-forward
    dense_ffn_size: int = 128
    first_k_dense: int = 1
    # mixture of experts
    num_experts: int = 8
    top_k: int = 2
    expert_ffn_size: int = 32
    num_shared_experts: int = 1
    score_func: Literal["softmax", "sigmoid"] = "softmax"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    n_group: int = 1  # group-limited routing: experts split into n_group groups
    topk_group: int = 1  # tokens may only use experts of their best topk_group groups
    expert_bias: bool = False  # aux-loss-free balancing: bias used for selection only
    bias_update_speed: float = 1e-3
    capacity_factor: Optional[float] = None  # None = dropless
    aux_loss_coeff: float = 1e-2
    aux_loss_scope: Literal["micro_batch", "sequence", "group"] = "micro_batch"
    z_loss_coeff: float = 0.0
    # normalisation and initialisation
    norm: Literal["sandwich", "pre"] = "sandwich"
    norm_eps: float = 1e-5
    dssn_attn_c: float = 0.283
    dssn_mlp_c: float = 0.432
    init: Literal["tiny", "standard"] = "tiny"
    init_std: float = 0.02  # standard init only
    embed_std: float = 0.5  # TinyInit embedding std
    tie_embeddings: bool = False
    # multi-token prediction
    mtp_layers: int = 0
    mtp_loss_weight: float = 0.3
    # pad the layer count with identity layers (pipeline balance); counted nowhere else
    noop_layers: int = 0

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.first_k_dense

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def validate(self, path: str = "") -> None:
        p = f"{path}." if path else ""
        for name in ("vocab_size", "hidden_size", "num_layers", "max_seq_len", "num_heads",
                     "dense_ffn_size", "expert_ffn_size", "num_experts", "top_k"):
            require(getattr(self, name) > 0, p + name, f"must be positive, got {getattr(self, name)}")
        for name in ("first_k_dense", "num_shared_experts", "mtp_layers", "noop_layers", "q_lora_rank"):
            require(getattr(self, name) >= 0, p + name, f"must be >= 0, got {getattr(self, name)}")
        require(self.first_k_dense <= self.num_layers, p + "first_k_dense",
              f"{self.first_k_dense} exceeds num_layers={self.num_layers}")
        require(self.top_k <= self.num_experts, p + "top_k",
              f"top_k={self.top_k} exceeds num_experts={self.num_experts}; lower top_k or add experts")
        if self.attention == "mla":
            for name in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                require(getattr(self, name) > 0, p + name, f"must be positive for MLA, got {getattr(self, name)}")
            require(self.qk_rope_head_dim % 2 == 0, p + "qk_rope_head_dim",
                  f"RoPE needs an even dimension, got {self.qk_rope_head_dim}")
        else:
            require(self.head_dim > 0 and self.head_dim % 2 == 0, p + "head_dim",
                  f"must be positive and even for RoPE, got {self.head_dim}")
            require(self.num_kv_heads > 0 and self.num_heads % self.num_kv_heads == 0, p + "num_kv_heads",
                  f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        require(self.n_group >= 1 and self.num_experts % self.n_group == 0, p + "n_group",
              f"num_experts={self.num_experts} must be divisible by n_group={self.n_group}")
        require(1 <= self.topk_group <= self.n_group, p + "topk_group",
              f"must be between 1 and n_group={self.n_group}, got {self.topk_group}")
        if self.n_group > 1:
            per_group = self.num_experts // self.n_group
            require(self.topk_group * per_group >= self.top_k, p + "topk_group",
                  f"topk_group={self.topk_group} groups of {per_group} experts cannot supply top_k={self.top_k}")
        if self.capacity_factor is not None:
            require(self.capacity_factor > 0, p + "capacity_factor",
                  f"must be positive (or null for dropless), got {self.capacity_factor}")
        require(self.norm_eps > 0, p + "norm_eps", f"must be positive, got {self.norm_eps}")
        require(self.routed_scaling_factor > 0, p + "routed_scaling_factor",
              f"must be positive, got {self.routed_scaling_factor}")
        for name in ("aux_loss_coeff", "z_loss_coeff", "mtp_loss_weight", "bias_update_speed"):
            require(getattr(self, name) >= 0, p + name, f"must be >= 0, got {getattr(self, name)}")


def load_model_config(path: str | Path) -> ModelConfig:
    return from_dict(ModelConfig, load_yaml(path), "model")


def model_section(value, base: Path) -> dict:
    """A recipe's `model:` entry as a mapping: given inline, or as a model YAML path relative to the
    recipe's folder `base` (or the working directory)."""
    if isinstance(value, dict):
        return value
    if isinstance(value, str):
        found = resolve_file(value, base)
        if found is None:
            raise ConfigError(f"model: file {value!r} not found (relative to {base} or the working directory)")
        return load_yaml(found)
    raise ConfigError(f"model: expected a path or a mapping of model fields, got {value!r}")
