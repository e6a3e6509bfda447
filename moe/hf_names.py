"""Our parameter names <-> Hugging Face DeepSeek-V3 tensor names, and the tensor transforms between
the two layouts; beside the model so that renaming a module breaks `tests/test_hf_names.py`, not an
export. The conversion itself (safetensors files, config.json) is `launch/hf/`.

Name map (ours -> HF; i = layer, j = expert, L = num_layers, k = MTP depth - 1):

    embed.weight                          model.embed_tokens.weight
    norm.weight / head.weight             model.norm.weight / lm_head.weight (no lm_head when tied)
    layers.i.attn_norm                    model.layers.i.input_layernorm
    layers.i.mlp_norm                     model.layers.i.post_attention_layernorm  (DeepSeek: the pre-MLP norm)
    layers.i.attn_post_norm               model.layers.i.post_self_attn_layernorm  (sandwich norm; GLM-4's name)
    layers.i.mlp_post_norm                model.layers.i.post_mlp_layernorm        (sandwich norm; GLM-4's name)
    attn.wq_a / q_norm / wq_b / wq        self_attn.q_a_proj / q_a_layernorm / q_b_proj / q_proj
    attn.wkv_a / kv_norm / wkv_b / wo     self_attn.kv_a_proj_with_mqa / kv_a_layernorm / kv_b_proj / o_proj
    attn.wq/wk/wv/wo (GQA)                self_attn.q_proj / k_proj / v_proj / o_proj
    mlp.w1 / w3 / w2 (dense)              mlp.gate_proj / up_proj / down_proj
    mlp.router.weight / .expert_bias      mlp.gate.weight / mlp.gate.e_score_correction_bias (zeros without
                                          expert_bias: DeepSeek-V3 engines always add it)
    mlp.experts.w1_EDF[j] (D x F)         mlp.experts.j.gate_proj.weight = transpose (F x D: Linear is [out, in])
    mlp.experts.w3_EDF[j]                 mlp.experts.j.up_proj.weight = transpose
    mlp.experts.w2_EFD[j] (F x D)         mlp.experts.j.down_proj.weight = transpose (D x F)
    mlp.shared.w1 / w3 / w2               mlp.shared_experts.gate_proj / up_proj / down_proj
    mtp.k.embed_norm / hidden_norm        model.layers.(L+k).enorm / hnorm
    mtp.k.proj                            model.layers.(L+k).eh_proj (column halves swapped: DeepSeek feeds
                                          [embedding, hidden], we feed [hidden, embedding])
    mtp.k.block.*                         model.layers.(L+k).* as for a layer
    mtp.k.norm                            model.layers.(L+k).shared_head.norm; the shared embedding and head
                                          are also written as model.layers.(L+k).embed_tokens / shared_head.head

RoPE: we rotate halves (channel c pairs with c + d/2); DeepSeek-V3 checkpoints store the rope
channels interleaved (pairs 2c, 2c+1; HF `rope_interleave: true`, vLLM's non-NeoX rotary). Export
reorders the rope output rows of q_b_proj (q_proj) per head and of kv_a_proj_with_mqa; import
undoes it. GQA weights are written in rotate-half (Llama) order, unchanged.
"""
from __future__ import annotations

from typing import Callable

import torch

from moe.config import ModelConfig

_ATTN = {"wq_a": "q_a_proj", "q_norm": "q_a_layernorm", "wq_b": "q_b_proj", "wkv_a": "kv_a_proj_with_mqa",
         "kv_norm": "kv_a_layernorm", "wkv_b": "kv_b_proj", "wo": "o_proj", "wq": "q_proj", "wk": "k_proj",
         "wv": "v_proj"}
_MLP = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_NORMS = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
          "attn_post_norm": "post_self_attn_layernorm", "mlp_post_norm": "post_mlp_layernorm"}
# Stacked expert tensors -> each expert's HF projection (transposed: Linear is [out, in]).
EXPERT_PROJ = {"w1_EDF": "gate_proj", "w3_EDF": "up_proj", "w2_EFD": "down_proj"}


def rope_rows(w: torch.Tensor, row_block: int, rope: int, to_hf: bool) -> torch.Tensor:
    """Reorder the last `rope` rows of every block of `row_block` rows: halves -> interleaved
    (to_hf) or back."""
    blocks = w.reshape(-1, row_block, *w.shape[1:])
    head, r = blocks[:, :row_block - rope], blocks[:, row_block - rope:]
    half = rope // 2
    if to_hf:
        r = torch.stack([r[:, :half], r[:, half:]], dim=2).reshape(r.shape)
    else:
        pairs = r.reshape(r.shape[0], half, 2, *r.shape[2:])
        r = torch.cat([pairs[:, :, 0], pairs[:, :, 1]], dim=1)
    return torch.cat([head, r], dim=1).reshape(w.shape)


def swap_halves(w: torch.Tensor) -> torch.Tensor:
    a, b = w.chunk(2, dim=1)
    return torch.cat([b, a], dim=1).contiguous()


def layer_map(cfg: ModelConfig, ours: str, hf: str) -> list[tuple[str, str, Callable, Callable]]:
    """(our name, HF name, to_hf, from_hf) for one transformer block's tensors."""
    same = lambda t: t  # noqa: E731
    out = []
    for o, h in _NORMS.items():
        if cfg.norm == "sandwich" or o in ("attn_norm", "mlp_norm"):
            out.append((f"{ours}.{o}.weight", f"{hf}.{h}.weight", same, same))
    attn = ["wq", "wk", "wv", "wo"] if cfg.attention == "gqa" else (
        ["wq_a", "q_norm", "wq_b"] if cfg.q_lora_rank > 0 else ["wq"]) + ["wkv_a", "kv_norm", "wkv_b", "wo"]
    for o in attn:
        to, back = same, same
        if cfg.attention == "mla" and o in ("wq_b", "wq"):
            blk, rope = cfg.qk_head_dim, cfg.qk_rope_head_dim
            to, back = (lambda t, b=blk, r=rope: rope_rows(t, b, r, True)), (lambda t, b=blk, r=rope: rope_rows(t, b, r, False))
        elif cfg.attention == "mla" and o == "wkv_a":
            blk, rope = cfg.kv_lora_rank + cfg.qk_rope_head_dim, cfg.qk_rope_head_dim
            to, back = (lambda t, b=blk, r=rope: rope_rows(t, b, r, True)), (lambda t, b=blk, r=rope: rope_rows(t, b, r, False))
        out.append((f"{ours}.attn.{o}.weight", f"{hf}.self_attn.{_ATTN[o]}.weight", to, back))
    return out


def name_map(cfg: ModelConfig) -> list[tuple[str, str, Callable, Callable]]:
    """Every (our key, HF key, to_hf, from_hf) except the expert stacks (see `expert_map`)."""
    same = lambda t: t  # noqa: E731
    out = [("embed.weight", "model.embed_tokens.weight", same, same), ("norm.weight", "model.norm.weight", same, same)]
    if not cfg.tie_embeddings:
        out.append(("head.weight", "lm_head.weight", same, same))
    blocks = [(f"layers.{i}", f"model.layers.{i}", i >= cfg.first_k_dense) for i in range(cfg.num_layers)]
    blocks += [(f"mtp.{k}.block", f"model.layers.{cfg.num_layers + k}", cfg.num_moe_layers > 0)
               for k in range(cfg.mtp_layers)]
    for ours, hf, moe in blocks:
        out += layer_map(cfg, ours, hf)
        if not moe:
            out += [(f"{ours}.mlp.{o}.weight", f"{hf}.mlp.{h}.weight", same, same) for o, h in _MLP.items()]
            continue
        out.append((f"{ours}.mlp.router.weight", f"{hf}.mlp.gate.weight", same, same))
        # DeepSeek-V3 engines always add the selection bias: without expert_bias we route without
        # one, so the faithful tensor is zeros (whatever the unused buffer holds).
        bias_out = same if cfg.expert_bias else torch.zeros_like
        out.append((f"{ours}.mlp.router.expert_bias", f"{hf}.mlp.gate.e_score_correction_bias", bias_out, same))
        if cfg.num_shared_experts > 0:
            out += [(f"{ours}.mlp.shared.{o}.weight", f"{hf}.mlp.shared_experts.{h}.weight", same, same)
                    for o, h in _MLP.items()]
    for k in range(cfg.mtp_layers):
        hf = f"model.layers.{cfg.num_layers + k}"
        out += [(f"mtp.{k}.embed_norm.weight", f"{hf}.enorm.weight", same, same),
                (f"mtp.{k}.hidden_norm.weight", f"{hf}.hnorm.weight", same, same),
                (f"mtp.{k}.proj.weight", f"{hf}.eh_proj.weight", swap_halves, swap_halves),
                (f"mtp.{k}.norm.weight", f"{hf}.shared_head.norm.weight", same, same)]
    return out


def expert_map(cfg: ModelConfig) -> list[tuple[str, str]]:
    """(our stacked key, HF prefix "model.layers.i.mlp.experts") of every MoE block."""
    out = [(f"layers.{i}.mlp.experts", f"model.layers.{i}.mlp.experts") for i in range(cfg.first_k_dense, cfg.num_layers)]
    if cfg.num_moe_layers > 0:
        out += [(f"mtp.{k}.block.mlp.experts", f"model.layers.{cfg.num_layers + k}.mlp.experts")
                for k in range(cfg.mtp_layers)]
    return out


def mtp_copies(cfg: ModelConfig) -> list[tuple[str, str]]:
    """HF keys DeepSeek-V3 repeats inside each MTP layer, and the shared tensor they copy."""
    head = "embed.weight" if cfg.tie_embeddings else "head.weight"
    out = []
    for k in range(cfg.mtp_layers):
        hf = f"model.layers.{cfg.num_layers + k}"
        out += [(f"{hf}.embed_tokens.weight", "embed.weight"), (f"{hf}.shared_head.head.weight", head)]
    return out
