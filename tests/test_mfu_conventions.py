"""MFU under published FLOP conventions (moe/mfu_conventions.py), hand-computed on the default tiny
model: D 64, 4 layers (1 dense), MLA with 4 heads (q_lora 32, kv_lora 32, nope 16, rope 8, v 16),
8 experts top-2 of FFN 32, one shared expert, dense FFN 128, vocab 256, sandwich norm; one MTP
module; sequence length 128."""
from pathlib import Path

import pytest

from moe import accounting as acc
from moe.config import ModelConfig
from moe.mfu_conventions import CONVENTIONS, flops_per_token, mfu_by_convention

S = 128


def tiny(**kw) -> ModelConfig:
    cfg = ModelConfig(mtp_layers=1, **kw)
    cfg.validate()
    return cfg


def test_megatron_convention_by_hand():
    # multiply-adds per token, Megatron-LM's formula term by term
    q = 32 * (64 + 4 * 24 + 1)  # q latent, its norm, q up-projection
    kv = 32 * (64 + 4 * (16 + 16) + 1) + 64 * 8  # kv latent, norm, up-projection; rope key
    o = 4 * 16 * 64
    core = S * 4 * (24 + 16) / 2  # causal half
    attention = (4 + 1) * (q + kv + o + core)  # the MTP module counts as a fifth layer
    mlp = 64 * (3 * 128 * 1 + 3 * (32 * 2 + 32) * (3 + 1))  # 1 dense, 3 + 1 (MTP) MoE layers
    mtp = 3 * 64 + 2 * 64 * 64
    logits = 64 * 256 * 2
    assert flops_per_token(tiny(), S, "megatron") == pytest.approx(6 * (attention + mlp + mtp + logits))
    assert 6 * (attention + mlp + mtp + logits) == 1_622_016


def test_6n_full_attention_convention_by_hand():
    attn_layer = 64 * 32 + 32 * 96 + 64 * 40 + 32 * 128 + 64 * 64 + 64  # projections + latent norms
    dense_layer = 3 * 64 * 128
    moe_active = 64 * 8 + 2 * 3 * 64 * 32 + 3 * 64 * 32  # router, 2 routed, 1 shared
    norms = 4 * 4 * 64 + 64  # sandwich (4 per layer) + final
    activated = (64 + 64 * 256) + norms + 4 * attn_layer + dense_layer + 3 * moe_active  # one embedding row + head
    assert acc.param_counts(tiny()).activated == activated
    full_attention = 4 * 6 * S * 4 * (24 + 16)  # every key for every query, no MTP
    assert flops_per_token(tiny(), S, "6n_full_attention") == pytest.approx(6 * activated + full_attention)


def test_ours_is_the_accounting_figure_and_conventions_order_as_expected():
    cfg = tiny()
    assert flops_per_token(cfg, S, "ultramoe") == acc.model_flops_per_token(cfg, S)
    # full attention doubles the core-attention term: the gap grows with the sequence length
    gap = [flops_per_token(cfg, s, "6n_full_attention") - flops_per_token(cfg, s, "ultramoe") for s in (128, 1024)]
    assert gap[1] > gap[0]
    with pytest.raises(ValueError, match="unknown FLOP convention 'palm'"):
        flops_per_token(cfg, S, "palm")


def test_mfu_by_convention_divides_by_devices_and_peak():
    cfg = tiny()
    m = mfu_by_convention(cfg, S, tokens_per_s=1000.0, peak_flops_per_s=1e9, devices=2)
    assert set(m) == set(CONVENTIONS)
    assert m["megatron"] == pytest.approx(1_622_016 * 1000 / 2e9)


def test_simulator_estimate_reports_every_convention_named():
    from simulator.cli import main
    import io, contextlib
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        main(["estimate", "--recipe", str(Path(__file__).parents[1] / "configs/simulator/pangu_718b_6k_910b.yaml")])
    out = buf.getvalue()
    for c in CONVENTIONS:
        assert f"  {c} " in out
    assert "tokens/s per device" in out and "(ultramoe convention)" in out
