"""Shared test fixtures: tiny configs and deterministic seeding."""
import pytest
import torch

from moe.config import ModelConfig


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_cfg() -> ModelConfig:
    return ModelConfig(vocab_size=64, hidden_size=32, num_layers=3, max_seq_len=32, num_heads=4,
                       q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                       v_head_dim=8, dense_ffn_size=64, first_k_dense=1, num_experts=8, top_k=2,
                       expert_ffn_size=16, num_shared_experts=1)
