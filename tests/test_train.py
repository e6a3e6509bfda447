"""Trainer tests: LR schedule, gradient accumulation, determinism, bf16, and an end-to-end run whose
loss falls on the embedded corpus."""
import json
import math
from dataclasses import replace

import pytest
import torch

from launch.trainer.recipe import DataConfig, Recipe, TrainConfig
from launch.trainer.loop import run
from launch.trainer.setup import build_model, build_optimizer
from launch.trainer.step import lr_at, train_step
from moe.config import ModelConfig


def test_lr_schedule_warmup_then_cosine():
    t = TrainConfig(steps=110, lr=1.0, min_lr=0.1, warmup_steps=10)
    assert lr_at(0, t) == pytest.approx(0.1)
    assert lr_at(9, t) == pytest.approx(1.0)
    assert lr_at(10, t) == pytest.approx(1.0)
    assert lr_at(60, t) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(110, t) == pytest.approx(0.1)


def _recipe(tmp_path, **train):
    model = ModelConfig(vocab_size=256, hidden_size=32, num_layers=2, max_seq_len=64, num_heads=2,
                        q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                        dense_ffn_size=64, num_experts=4, top_k=2, expert_ffn_size=16, mtp_layers=1)
    t = dict(steps=3, micro_batch_size=4, seq_len=32, device="cpu", out_dir=str(tmp_path / "run"),
             progress=False, tensorboard=False, warmup_steps=1, eval_batches=2)
    t.update(train)
    return Recipe(model=model, train=TrainConfig(**t),
                  data=DataConfig(cache_dir=str(tmp_path.parent / "shared_data"), embedded_docs=300))


def _batches(n, b, s, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        tok = torch.randint(0, 256, (b, s + 1), generator=g)
        yield {"tokens": tok[:, :-1], "labels": tok[:, 1:]}


def test_grad_accumulation_equals_one_big_batch(tmp_path):
    # 2 micro-batches of 4 == 1 micro-batch of 8 (same samples), aux loss off: it is per micro-batch.
    r = _recipe(tmp_path)
    r = replace(r, model=replace(r.model, aux_loss_coeff=0.0))
    big = list(_batches(1, 8, 16))[0]
    halves = [{k: v[:4] for k, v in big.items()}, {k: v[4:] for k, v in big.items()}]
    grads = []
    for accum, batches in ((1, [big]), (2, halves)):
        t = replace(r.train, grad_accum=accum, micro_batch_size=8 // accum, grad_clip=0.0)
        model = build_model(replace(r, train=t))
        opt = build_optimizer(model, t)
        opt.step = lambda: None  # keep the gradients for comparison
        opt.zero_grad = lambda set_to_none=True: None
        train_step(model, opt, iter(batches), t, "cpu")
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_training_is_deterministic_and_loss_falls(tmp_path):
    r = _recipe(tmp_path, steps=12, lr=3e-3)
    h1 = run(r, progress=False)
    h2 = run(replace(r, train=replace(r.train, out_dir=str(tmp_path / "run2"))), progress=False, log=False)
    assert [h["loss"] for h in h1] == [h["loss"] for h in h2]
    assert h1[-1]["lm_loss"] < h1[0]["lm_loss"] - 0.5
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 12
    rec = json.loads(lines[-1])
    for key in ("loss", "aux_loss", "tokens_per_s", "mfu", "layer_imbalance", "grad_norm", "lr"):
        assert key in rec
    assert len(rec["layer_imbalance"]) == 1 + 1  # one MoE layer + the MTP block's MoE layer
    assert all(x >= 1.0 for x in rec["layer_imbalance"])
    assert 0 < rec["mfu"] < 1
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["first_loss"] == h1[0]["lm_loss"]
    by_convention = summary["median_mfu_by_convention"]
    assert set(by_convention) == {"ultramoe", "megatron", "6n_full_attention"}
    assert by_convention["ultramoe"] == pytest.approx(summary["median_mfu"])
    assert summary["tokens_per_s_per_device"] == pytest.approx(summary["median_tokens_per_s"])  # one process


def test_bf16_autocast_trains(tmp_path):
    h = run(_recipe(tmp_path, steps=4, dtype="bf16", kernels="fast"), progress=False, log=False)
    assert all(math.isfinite(x["loss"]) for x in h)


def test_aux_loss_free_bias_moves_during_training(tmp_path):
    r = _recipe(tmp_path, steps=3)
    r = replace(r, model=replace(r.model, expert_bias=True, bias_update_speed=0.01, score_func="sigmoid"))
    model = build_model(r)
    opt = build_optimizer(model, r.train)
    train_step(model, opt, _batches(1, 4, 16), r.train, "cpu")
    biases = torch.stack([m.router.expert_bias for m in model.moe_layers()])
    assert biases.abs().sum() > 0
    assert torch.isclose(biases.abs(), torch.tensor(0.01)).logical_or(biases == 0).all()
