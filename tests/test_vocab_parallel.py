"""Vocabulary parallelism (parallel/vocab_parallel.py) on 2 gloo ranks against single-process torch.

Whole-model equivalence with vocab-parallel embedding and head runs in tests/test_parallel_tp.py
(every TP scenario has it on, one has it off) and tests/test_pipeline.py (pp2 x tp2). These tests
check the pieces directly, where a wrong sign, a missed ignored label or a double-counted gradient
shows without an optimizer in between: the split cross-entropy's losses and logit gradients (fp32
and bf16 logits, labels -100 ignored, targets in either rank's slice), the split embedding's output
(bitwise) and weight gradient, and the memory the split saves: the activations kept for backward
by the head and cross-entropy shrink by half of the fp32 logits.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dist_utils import run_distributed

N, V, D = 24, 16, 8


def _data(dtype: torch.dtype):
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(N, V, generator=g) * 3).to(dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::5] = -100
    grad_out = torch.rand(N, generator=g)
    return logits, labels, grad_out


def _cross_entropy_rank(dtype: torch.dtype):
    import torch.distributed as dist
    from parallel.vocab_parallel import vocab_parallel_token_losses
    rank, tp = dist.get_rank(), dist.get_world_size()
    logits, labels, grad_out = _data(dtype)
    local = logits[:, rank * V // tp:(rank + 1) * V // tp].clone().requires_grad_(True)
    losses = vocab_parallel_token_losses(local, labels, rank * V // tp, dist.group.WORLD)
    losses.backward(grad_out)
    return losses.detach(), local.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_cross_entropy_matches_torch(dtype):
    logits, labels, grad_out = _data(dtype)
    full = logits.clone().requires_grad_(True)
    ref = F.cross_entropy(full.float(), labels, reduction="none")
    ref.backward(grad_out)
    ranks = run_distributed(_cross_entropy_rank, 2, dtype)
    for losses, _ in ranks:
        assert torch.allclose(losses, ref.detach(), rtol=1e-6, atol=1e-6)
    assert (ranks[0][0][::5] == 0).all()  # ignored labels: zero loss
    grad = torch.cat([g for _, g in ranks], dim=1)
    assert grad.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert torch.allclose(grad.float(), full.grad.float(), rtol=tol, atol=tol)
    assert (grad[::5] == 0).all()  # and no gradient


def _embedding_rank():
    import torch.distributed as dist
    from parallel.layout import Shard
    from parallel.vocab_parallel import _embedding_forward, _split_rows
    rank, tp = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    embed = torch.nn.Embedding(V, D)
    embed.weight = _split_rows(embed.weight, Shard(0, rank, tp))
    embed.num_embeddings = V // tp
    embed.forward = _embedding_forward(embed, rank * V // tp, dist.group.WORLD)
    tokens = torch.randint(0, V, (3, 7), generator=torch.Generator().manual_seed(5))
    out = embed(tokens)
    (out * torch.arange(D)).sum().backward()
    return out.detach(), embed.weight.grad


def test_split_embedding_is_the_full_lookup():
    torch.manual_seed(0)
    embed = torch.nn.Embedding(V, D)
    tokens = torch.randint(0, V, (3, 7), generator=torch.Generator().manual_seed(5))
    ref = embed(tokens)
    (ref * torch.arange(D)).sum().backward()
    ranks = run_distributed(_embedding_rank, 2)
    for out, _ in ranks:
        assert torch.equal(out, ref.detach())
    assert torch.equal(torch.cat([g for _, g in ranks]), embed.weight.grad)


def _saved_bytes_rank(vocab_parallel: bool) -> tuple[int, float]:
    from moe.config import ModelConfig
    from parallel.config import ParallelConfig
    from parallel.memory import MemoryManager
    from parallel.memory_config import MemoryConfig
    from parallel.runtime import ParallelRuntime, build_full_model
    cfg = ModelConfig(vocab_size=4096, hidden_size=32, num_layers=2, max_seq_len=64, num_heads=2, q_lora_rank=16,
                      kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, dense_ffn_size=64,
                      first_k_dense=1, num_experts=4, top_k=2, expert_ffn_size=16, num_shared_experts=1)
    rt = ParallelRuntime.setup(ParallelConfig(tp=2, dispatcher="local", vocab_parallel=vocab_parallel), cfg)
    torch.manual_seed(0)
    model = rt.parallelize(build_full_model(cfg, None))
    memory = MemoryManager(model, MemoryConfig(), "cpu")
    tokens = torch.randint(0, cfg.vocab_size, (2, 65), generator=torch.Generator().manual_seed(1))
    with memory.step(model):
        out = model(tokens[:, :-1], tokens[:, 1:])
        out.loss.backward()
    return memory.metrics(model, torch.optim.AdamW(model.parameters()))["mem_saved_activation_peak_bytes"], \
        float(out.loss.detach())


def test_split_head_keeps_half_the_logits():
    (replicated, loss_r), _ = run_distributed(_saved_bytes_rank, 2, False)
    (split, loss_s), _ = run_distributed(_saved_bytes_rank, 2, True)
    half_logits = 2 * 64 * 4096 * 4 / 2  # fp32 softmax of 128 tokens: this rank's half of the vocabulary
    assert abs((replicated - split) - half_logits) <= 0.02 * half_logits, (replicated, split)
    assert abs(loss_s - loss_r) <= 1e-6 * abs(loss_r)
