"""Model tests: TinyInit and DSSN initial statistics, attention shapes and causality, MoE layer
against a per-token reference, MTP loss, and parameter counts against moe.accounting."""
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from moe_kernels import get_kernels
from moe.accounting import param_counts
from moe.attention import GQA, MLA
from moe.layer import MoELayer
from moe.model import MoETransformer


def test_tinyinit_and_dssn_statistics(tiny_cfg):
    cfg = replace(tiny_cfg, hidden_size=256, num_layers=8, dense_ffn_size=512, expert_ffn_size=128,
                  num_experts=8, vocab_size=512)
    model = MoETransformer(cfg, get_kernels("reference"))
    expected_std = math.sqrt(1 / (2 * 256 * 8))
    layer = model.layers[2]
    for w in (layer.attn.wkv_b.weight, layer.mlp.experts.w1_EDF, layer.mlp.router.weight, model.head.weight):
        assert w.std().item() == pytest.approx(expected_std, rel=0.05)
        assert abs(w.mean().item()) < 4 * expected_std / math.sqrt(w.numel())  # 4 sigma
    assert model.embed.weight.std().item() == pytest.approx(0.5, rel=0.05)
    assert torch.allclose(layer.attn_post_norm.weight, torch.full((256,), 0.283 / math.sqrt(8)))
    assert torch.allclose(layer.mlp_post_norm.weight, torch.full((256,), 0.432 / math.sqrt(8)))
    assert torch.all(layer.attn_norm.weight == 1) and torch.all(layer.attn.kv_norm.weight == 1)


def test_standard_init_and_prenorm(tiny_cfg):
    cfg = replace(tiny_cfg, init="standard", init_std=0.02, norm="pre", hidden_size=128, dense_ffn_size=512)
    model = MoETransformer(cfg, get_kernels("reference"))
    assert model.layers[0].mlp.w1.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert isinstance(model.layers[0].attn_post_norm, torch.nn.Identity)


@pytest.mark.parametrize("attention", ["mla", "gqa"])
def test_attention_shapes_and_causality(tiny_cfg, attention):
    cfg = replace(tiny_cfg, attention=attention, num_kv_heads=2, head_dim=8)
    attn = (MLA if attention == "mla" else GQA)(cfg)
    x = torch.randn(2, 10, cfg.hidden_size)
    y = attn(x)
    assert y.shape == x.shape
    x2 = x.clone()
    x2[:, 6:] += torch.randn(2, 4, cfg.hidden_size)  # change the future
    y2 = attn(x2)
    torch.testing.assert_close(y[:, :6], y2[:, :6])  # past outputs unchanged
    assert not torch.allclose(y[:, 6:], y2[:, 6:])


def test_mla_without_q_lora(tiny_cfg):
    attn = MLA(replace(tiny_cfg, q_lora_rank=0))
    assert hasattr(attn, "wq") and not hasattr(attn, "wq_a")
    assert attn(torch.randn(1, 5, tiny_cfg.hidden_size)).shape == (1, 5, tiny_cfg.hidden_size)


def test_gqa_matches_mha_when_kv_heads_repeated(tiny_cfg):
    cfg = replace(tiny_cfg, attention="gqa", num_kv_heads=2, head_dim=8)
    gqa = GQA(cfg)
    mha = GQA(replace(cfg, num_kv_heads=4))
    with torch.no_grad():
        mha.wq.weight.copy_(gqa.wq.weight)
        mha.wo.weight.copy_(gqa.wo.weight)
        for name in ("wk", "wv"):
            w = getattr(gqa, name).weight.view(2, 8, -1)
            getattr(mha, name).weight.copy_(w.repeat_interleave(2, dim=0).reshape(32, -1))
    x = torch.randn(2, 7, cfg.hidden_size)
    torch.testing.assert_close(gqa(x), mha(x))


@pytest.mark.parametrize("kernels", ["reference", "fast"])
def test_moe_layer_equals_per_token_reference(tiny_cfg, kernels):
    cfg = replace(tiny_cfg, num_experts=6, top_k=2, num_shared_experts=1)
    layer = MoELayer(cfg, get_kernels(kernels))
    layer.train()
    x = torch.randn(2, 9, cfg.hidden_size)
    y, _ = layer(x)
    routing = layer.router(x.view(-1, cfg.hidden_size))
    e = layer.experts
    expected = torch.zeros(18, cfg.hidden_size)
    for t in range(18):
        xt = x.view(-1, cfg.hidden_size)[t]
        for k in range(cfg.top_k):
            i = routing.expert_idx_TK[t, k]
            h = F.silu(xt @ e.w1_EDF[i]) * (xt @ e.w3_EDF[i])
            expected[t] += routing.weights_TK[t, k] * (h @ e.w2_EFD[i])
    expected += layer.shared(x.view(-1, cfg.hidden_size))
    torch.testing.assert_close(y.view(-1, cfg.hidden_size), expected, rtol=1e-5, atol=1e-6)


def test_moe_layer_with_empty_experts_and_drops(tiny_cfg):
    cfg = replace(tiny_cfg, num_experts=16, top_k=1, capacity_factor=0.5)
    layer = MoELayer(cfg, get_kernels("fast"))
    layer.train()
    x = torch.randn(1, 4, cfg.hidden_size, requires_grad=True)  # 4 tokens, 16 experts: most empty
    y, aux = layer(x)
    (y.sum() + aux["aux_loss"]).backward()
    assert torch.isfinite(x.grad).all() and layer.experts.w1_EDF.grad is not None


def test_mtp_loss_predicts_two_ahead(tiny_cfg):
    cfg = replace(tiny_cfg, mtp_layers=1, mtp_loss_weight=0.5)
    model = MoETransformer(cfg, get_kernels("reference"))
    tokens = torch.randint(0, cfg.vocab_size, (2, 12))
    labels = torch.roll(tokens, -1, 1)
    out = model(tokens, labels)
    assert out.mtp_loss.item() > 0
    torch.testing.assert_close(out.loss, out.lm_loss + 0.5 * out.mtp_loss + out.aux_loss + out.z_loss)
    # The MTP target at position i is labels[i + 1]: recompute it from the modules by hand.
    emb = model.embed(tokens)
    h = emb
    for layer in model.layers:
        h, _ = layer(h)
    mod = model.mtp[0]
    h1, _ = mod(h[:, :11], emb[:, 1:])
    logits = model.logits(mod.norm(h1))
    expected = F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten())
    torch.testing.assert_close(out.mtp_loss, expected)
    # and it trains the MTP module's parameters
    out.loss.backward()
    assert model.mtp[0].proj.weight.grad.abs().sum() > 0


def test_model_loss_starts_near_uniform_and_backprops(tiny_cfg):
    model = MoETransformer(tiny_cfg, get_kernels("fast"))
    tokens = torch.randint(0, tiny_cfg.vocab_size, (2, 16))
    out = model(tokens, torch.roll(tokens, -1, 1))
    assert abs(out.lm_loss.item() - math.log(tiny_cfg.vocab_size)) < 0.5
    out.loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []


@pytest.mark.parametrize("variant", [
    {}, {"attention": "gqa", "num_kv_heads": 2, "head_dim": 8}, {"q_lora_rank": 0}, {"norm": "pre"},
    {"mtp_layers": 2}, {"tie_embeddings": True}, {"num_shared_experts": 0}, {"first_k_dense": 0}])
def test_built_model_parameter_count_matches_accounting(tiny_cfg, variant):
    cfg = replace(tiny_cfg, **variant)
    model = MoETransformer(cfg, get_kernels("reference"))
    built = sum(p.numel() for p in model.parameters())
    counts = param_counts(cfg)
    assert built == counts.total_with_mtp


def test_same_seed_same_model(tiny_cfg):
    torch.manual_seed(7)
    a = MoETransformer(tiny_cfg, get_kernels("reference"))
    torch.manual_seed(7)
    b = MoETransformer(tiny_cfg, get_kernels("fast"))
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert na == nb and torch.equal(pa, pb)
