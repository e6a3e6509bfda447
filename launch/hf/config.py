"""config.json of a Hugging Face export: our `ModelConfig` -> DeepSeek-V3 fields, and back.

config.json carries the DeepSeek-V3 fields inference engines read plus an `ultramoe` block with our
full ModelConfig, so import restores the exact model; without that block (a genuine DeepSeek-V3
checkpoint, e.g. one saved by transformers) the config is derived from the DeepSeek fields.

Only models that transformers' `DeepseekV3ForCausalLM` computes exactly are labelled as that class
(`transformers_gaps` lists what stands in the way); any other export is marked `model_type:
ultramoe`, which transformers refuses to load, instead of loading and computing something else.
"""
from __future__ import annotations

from dataclasses import asdict

import torch

from config import from_dict
from moe.config import ModelConfig

MARKED_TYPE = "ultramoe"  # model_type of exports transformers must not load as DeepSeek-V3
LATENT_NORM_EPS = 1e-6  # transformers' DeepseekV3 q_a/kv_a_layernorm eps, whatever rms_norm_eps says


class HFError(ValueError):
    """An export or import cannot proceed; the message names the problem and the fix."""


def transformers_gaps(cfg: ModelConfig) -> list[str]:
    """Why transformers' DeepseekV3ForCausalLM would compute other logits than ours (empty: it
    computes ours; tests/test_hf_transformers.py checks that to 1e-4)."""
    gaps = []
    if cfg.attention != "mla":
        gaps.append(f"attention={cfg.attention} (it has MLA attention only)")
    if cfg.attention == "mla" and cfg.norm_eps != LATENT_NORM_EPS:
        gaps.append(f"norm_eps={cfg.norm_eps:g} (its q/kv latent norms always use {LATENT_NORM_EPS:g})")
    if cfg.norm != "pre":
        gaps.append(f"norm={cfg.norm} (it has no post-attention/post-MLP norms)")
    if cfg.num_moe_layers and cfg.score_func != "sigmoid":
        gaps.append(f"score_func={cfg.score_func} (it always routes with sigmoid scores)")
    if cfg.num_moe_layers and cfg.n_group > 1 and cfg.num_experts // cfg.n_group < 2:
        gaps.append(f"n_group={cfg.n_group} with one expert per group (its group score sums two experts)")
    if cfg.capacity_factor is not None:
        gaps.append(f"capacity_factor={cfg.capacity_factor} (it never drops tokens; we drop at inference too)")
    if cfg.mtp_layers:
        gaps.append(f"mtp_layers={cfg.mtp_layers} (it reads MTP weights only at layer index 61, and its MTP "
                    "drafter is not checked against ours)")
    return gaps


def hf_config(cfg: ModelConfig, dtype: torch.dtype) -> dict:
    gaps = transformers_gaps(cfg)
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    return {
        "architectures": ["UltraMoEForCausalLM" if gaps else "DeepseekV3ForCausalLM"],
        "model_type": MARKED_TYPE if gaps else "deepseek_v3",
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
        # transformers 5 reads rope_parameters, 4.x and other engines rope_theta / rope_scaling
        "rope_interleave": cfg.attention == "mla", "rope_theta": cfg.rope_theta, "rope_scaling": None,
        "rope_parameters": rope,
        "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False, "attention_dropout": 0.0,
        "torch_dtype": str(dtype).removeprefix("torch."), "dtype": str(dtype).removeprefix("torch."),
        "ultramoe": {"model": asdict(cfg), "sandwich_norm": cfg.norm == "sandwich", "attention": cfg.attention,
                     "transformers_loadable": not gaps, "transformers_gaps": gaps},
    }


def config_from_hf(conf: dict) -> ModelConfig:
    """Our ModelConfig from config.json: the `ultramoe` block when present, else DeepSeek fields."""
    if not isinstance(conf, dict):
        raise HFError(f"config.json: expected a JSON object, got {type(conf).__name__}")
    if "ultramoe" in conf:
        block = conf["ultramoe"]
        if not isinstance(block, dict) or "model" not in block:
            raise HFError("config.json: the 'ultramoe' block has no 'model' mapping; re-export the model")
        return from_dict(ModelConfig, block["model"], "config.json:ultramoe.model")
    if conf.get("model_type") == MARKED_TYPE:
        raise HFError("config.json: model_type 'ultramoe' without its 'ultramoe' block; re-export the model")
    try:
        fields = _deepseek_fields(conf)
    except KeyError as e:
        raise HFError(f"config.json: missing {e.args[0]!r}; only DeepSeek-V3 style (MLA + MoE) configs can be "
                      "imported") from None
    except (TypeError, ValueError, AttributeError) as e:
        raise HFError(f"config.json: a field has the wrong type ({e})") from None
    if conf.get("hidden_act", "silu") != "silu":
        raise HFError(f"config.json: hidden_act={conf['hidden_act']!r}; this model's MLPs use silu only")
    if fields.pop("rope_scaled"):
        raise HFError("config.json: rope scaling (e.g. YaRN) is not supported by this model; remove it only if "
                      "the weights were trained without it")
    return from_dict(ModelConfig, fields, "config.json")


def _deepseek_fields(conf: dict) -> dict:
    rope = conf.get("rope_parameters") or {}
    return dict(
        rope_scaled=bool(conf.get("rope_scaling")) or rope.get("rope_type", "default") != "default",
        vocab_size=conf["vocab_size"], hidden_size=conf["hidden_size"], num_layers=conf["num_hidden_layers"],
        max_seq_len=conf.get("max_position_embeddings", 4096), attention="mla", num_heads=conf["num_attention_heads"],
        q_lora_rank=conf.get("q_lora_rank") or 0, kv_lora_rank=conf["kv_lora_rank"],
        qk_nope_head_dim=conf["qk_nope_head_dim"], qk_rope_head_dim=conf["qk_rope_head_dim"],
        v_head_dim=conf["v_head_dim"], rope_theta=float(rope.get("rope_theta") or conf.get("rope_theta") or 10000.0),
        dense_ffn_size=conf["intermediate_size"], first_k_dense=conf.get("first_k_dense_replace", 0),
        num_experts=conf["n_routed_experts"], top_k=conf["num_experts_per_tok"],
        expert_ffn_size=conf["moe_intermediate_size"], num_shared_experts=conf.get("n_shared_experts") or 0,
        # transformers' DeepseekV3 config has neither field: it always scores with sigmoid and always
        # adds e_score_correction_bias for selection (DeepSeek-V3's noaux_tc)
        score_func=conf.get("scoring_func", "sigmoid"), expert_bias=conf.get("topk_method", "noaux_tc") == "noaux_tc",
        norm_topk_prob=conf.get("norm_topk_prob", True),
        routed_scaling_factor=float(conf.get("routed_scaling_factor", 1.0)), n_group=conf.get("n_group") or 1,
        topk_group=conf.get("topk_group") or 1, norm="pre", norm_eps=float(conf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(conf.get("tie_word_embeddings", False)),
        mtp_layers=conf.get("num_nextn_predict_layers", 0) or 0)
