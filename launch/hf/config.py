"""config.json of a Hugging Face export: our `ModelConfig` -> DeepSeek-V3 fields, and back.

config.json carries the DeepSeek-V3 fields inference engines read plus an `ultramoe` block with our
full ModelConfig, so import restores the exact model; without that block (a genuine DeepSeek-V3
style checkpoint) the config is derived from the DeepSeek fields. A model with sandwich norms or
GQA attention is not a DeepSeek-V3 architecture: engines need a model class that knows the extra
norms (e.g. openPangu's); the round trip is exact either way.
"""
from __future__ import annotations

from dataclasses import asdict

import torch

from config import from_dict
from moe.config import ModelConfig


class HFError(ValueError):
    """An export or import cannot proceed; the message names the problem and the fix."""


def hf_config(cfg: ModelConfig, dtype: torch.dtype) -> dict:
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.dense_ffn_size,
        "moe_intermediate_size": cfg.expert_ffn_size, "num_hidden_layers": cfg.num_layers,
        "num_nextn_predict_layers": cfg.mtp_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads if cfg.attention == "gqa" else cfg.num_heads,
        "n_shared_experts": cfg.num_shared_experts, "n_routed_experts": cfg.num_experts,
        "num_experts_per_tok": cfg.top_k, "routed_scaling_factor": cfg.routed_scaling_factor,
        "scoring_func": cfg.score_func, "topk_method": "noaux_tc" if cfg.expert_bias else "greedy",
        "n_group": cfg.n_group, "topk_group": cfg.topk_group, "norm_topk_prob": cfg.norm_topk_prob,
        "first_k_dense_replace": cfg.first_k_dense, "moe_layer_freq": 1,
        "q_lora_rank": cfg.q_lora_rank or None, "kv_lora_rank": cfg.kv_lora_rank,
        "qk_nope_head_dim": cfg.qk_nope_head_dim, "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "v_head_dim": cfg.v_head_dim, "head_dim": cfg.head_dim if cfg.attention == "gqa" else cfg.qk_rope_head_dim,
        "rope_interleave": cfg.attention == "mla", "rope_theta": cfg.rope_theta, "rope_scaling": None,
        "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False, "attention_dropout": 0.0,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "ultramoe": {"model": asdict(cfg), "sandwich_norm": cfg.norm == "sandwich", "attention": cfg.attention},
    }


def config_from_hf(conf: dict) -> ModelConfig:
    """Our ModelConfig from config.json: the `ultramoe` block when present, else DeepSeek fields."""
    if "ultramoe" in conf:
        return from_dict(ModelConfig, conf["ultramoe"]["model"], "config.json:ultramoe.model")
    try:
        fields = dict(
            vocab_size=conf["vocab_size"], hidden_size=conf["hidden_size"], num_layers=conf["num_hidden_layers"],
            max_seq_len=conf.get("max_position_embeddings", 4096), attention="mla", num_heads=conf["num_attention_heads"],
            q_lora_rank=conf.get("q_lora_rank") or 0, kv_lora_rank=conf["kv_lora_rank"],
            qk_nope_head_dim=conf["qk_nope_head_dim"], qk_rope_head_dim=conf["qk_rope_head_dim"],
            v_head_dim=conf["v_head_dim"], rope_theta=float(conf.get("rope_theta", 10000.0)),
            dense_ffn_size=conf["intermediate_size"], first_k_dense=conf.get("first_k_dense_replace", 0),
            num_experts=conf["n_routed_experts"], top_k=conf["num_experts_per_tok"],
            expert_ffn_size=conf["moe_intermediate_size"], num_shared_experts=conf.get("n_shared_experts") or 0,
            score_func=conf.get("scoring_func", "sigmoid"), norm_topk_prob=conf.get("norm_topk_prob", True),
            routed_scaling_factor=float(conf.get("routed_scaling_factor", 1.0)), n_group=conf.get("n_group") or 1,
            topk_group=conf.get("topk_group") or 1, expert_bias=conf.get("topk_method") == "noaux_tc",
            norm="pre", norm_eps=float(conf.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(conf.get("tie_word_embeddings", False)),
            mtp_layers=conf.get("num_nextn_predict_layers", 0) or 0)
    except KeyError as e:
        raise HFError(f"config.json: missing {e.args[0]!r}; only DeepSeek-V3 style (MLA + MoE) configs can be "
                      "imported") from None
    if conf.get("rope_scaling"):
        raise HFError("config.json: rope_scaling (e.g. YaRN) is not supported by this model; remove it only if "
                      "the weights were trained without it")
    return from_dict(ModelConfig, fields, "config.json")
