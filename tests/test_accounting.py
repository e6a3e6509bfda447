"""Parameter and FLOP accounting: hand-computed tiny cases and the published large-model figures."""
from pathlib import Path

import pytest

from moe import accounting as acc
from config import from_dict
from moe.config import ModelConfig, load_model_config

ROOT = Path(__file__).resolve().parents[1]

# D=8, vocab 10, 3 layers (1 dense), MLA with H=2, 4 experts top-2, 2 shared experts, 1 MTP module.
TINY = dict(vocab_size=10, hidden_size=8, num_layers=3, first_k_dense=1, attention="mla", num_heads=2,
            q_lora_rank=4, kv_lora_rank=6, qk_nope_head_dim=3, qk_rope_head_dim=2, v_head_dim=5,
            dense_ffn_size=12, num_experts=4, top_k=2, expert_ffn_size=3, num_shared_experts=2,
            norm="sandwich", mtp_layers=1)


def tiny(**over) -> ModelConfig:
    return from_dict(ModelConfig, {**TINY, **over})


def test_tiny_mla_param_counts_by_hand():
    p = acc.param_counts(tiny())
    # MLA layer: wq_a 8*4 + q_norm 4 + wq_b 4*(2*5) + wkv_a 8*(6+2) + kv_norm 6 + wkv_b 6*(2*(3+5)) + wo 10*8
    assert p.per_layer["attention"] == 32 + 4 + 40 + 64 + 6 + 96 + 80 == 322
    # MoE block: router 8*4, experts 4 * 3*8*3, shared SwiGLU of 2*3: 3*8*6
    assert p.per_layer["moe_layer"] == 32 + 4 * 72 + 144
    # embed 80 + head 80 + 3 layers * 4 norms * 8 + final norm 8 + attention 3*322 + dense 3*8*12 + 2 MoE blocks
    assert p.total == 80 + 80 + 96 + 8 + 966 + 288 + 2 * 464 == 2446
    # one embedding row (8) instead of the table; MoE block active: router 32 + 2 experts 144 + shared 144
    assert p.activated == 8 + 80 + 96 + 8 + 966 + 288 + 2 * (32 + 144 + 144) == 2086
    # MTP: enorm+hnorm 16, proj 16*8, attention 322, its 4 norms 32, final norm 8, MoE block 464
    assert p.mtp_total == 16 + 128 + 322 + 32 + 8 + 464 == 970
    assert p.mtp_activated == 16 + 128 + 322 + 32 + 8 + 320
    assert p.total_with_mtp == 2446 + 970
    parts = (p.embedding + p.output_head + p.attention + p.dense_mlp + p.routed_experts
             + p.shared_experts + p.router + p.norms)
    assert parts == p.total


def test_variants_gqa_pre_norm_tied_no_q_lora():
    # GQA: wq 8x(4*2) + wk 8x(2*2) + wv 8x(2*2) + wo 8x8; no latent norms
    c = tiny(attention="gqa", num_heads=4, num_kv_heads=2, head_dim=2, norm="pre", tie_embeddings=True,
             num_shared_experts=0, mtp_layers=0)
    p = acc.param_counts(c)
    assert p.per_layer["attention"] == 64 + 32 + 32 + 64
    assert p.output_head == 0 and p.mtp_total == 0
    moe = 32 + 4 * 72
    assert p.total == 80 + 3 * 16 + 8 + 3 * 192 + 288 + 2 * moe
    # tied head reads the whole table, so the table counts as activated (once)
    assert p.activated == 80 + 3 * 16 + 8 + 3 * 192 + 288 + 2 * (32 + 144)
    c2 = tiny(q_lora_rank=0)
    assert acc.param_counts(c2).per_layer["attention"] == 8 * 10 + 64 + 6 + 96 + 80


def test_tiny_forward_flops_per_operator_by_hand():
    c, S = tiny(), 10
    assert acc.attention_proj_flops(c) == 2 * (32 + 40 + 64 + 96 + 80) == 624
    # causal: 2 * H * (S/2) * (d_qk + d_v) = 2*2*5*(5+5)
    assert acc.core_attention_flops(c, S) == 200
    assert acc.router_flops(c) == 2 * 8 * 4
    assert acc.routed_expert_flops(c) == 2 * (2 * 72)  # top-2 experts of 72 weights each
    assert acc.shared_expert_flops(c) == 2 * 144
    assert acc.dense_mlp_flops(c) == 2 * 288
    assert acc.output_head_flops(c) == 2 * 80
    # MTP: proj 2*16*8 + MoE layer (624+200+64+288+288) + head again 160
    assert acc.mtp_module_flops(c, S) == 256 + 1464 + 160 == 1880
    br = acc.forward_flops_breakdown(c, S)
    assert br == {"attention_proj": 3 * 624, "core_attention": 600, "router": 128, "routed_experts": 576,
                  "shared_experts": 576, "dense_mlp": 576, "output_head": 160, "mtp": 1880}
    assert acc.model_flops_per_token(c, S) == 3 * 6368
    assert acc.model_flops_per_token(c, S, include_mtp=False) == 3 * (6368 - 1880)


def test_gqa_core_attention_flops_by_hand():
    c = tiny(attention="gqa", num_heads=4, num_kv_heads=2, head_dim=2)
    assert acc.core_attention_flops(c, 16) == 2 * 4 * 8 * (2 + 2)


@pytest.mark.parametrize("name,total,active", [("pangu_ultra_moe_718b", 718e9, 39e9),
                                                ("deepseek_v3_671b", 671e9, 37e9)])
def test_published_parameter_counts(name, total, active):
    cfg = load_model_config(ROOT / "configs" / "models" / f"{name}.yaml")
    p = acc.param_counts(cfg)
    assert abs(p.total / total - 1) < 0.02, acc.format_params(p.total)
    assert abs(p.activated / active - 1) < 0.02, acc.format_params(p.activated)
    # including MTP would miss the 671B figure by more than 1.5%: the headline excludes it
    assert p.total_with_mtp > p.total * 1.015


def test_deepseek_yaml_fields():
    cfg = load_model_config(ROOT / "configs" / "models" / "deepseek_v3_671b.yaml")
    assert (cfg.n_group, cfg.topk_group, cfg.expert_bias, cfg.norm) == (8, 4, True, "pre")
    pangu = load_model_config(ROOT / "configs" / "models" / "pangu_ultra_moe_718b.yaml")
    assert (pangu.norm, pangu.aux_loss_scope, pangu.routed_scaling_factor) == ("sandwich", "group", 2.5)
