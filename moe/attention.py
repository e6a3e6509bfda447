"""Self-attention: multi-head latent attention (MLA) and grouped-query attention (GQA).

Both use causal `scaled_dot_product_attention`; RoPE is applied to the decoupled rope channels (MLA)
or to the whole head (GQA).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from moe.config import ModelConfig
from moe.layers import RMSNorm, RotaryEmbedding


class MLA(nn.Module):
    """Queries and keys/values pass through low-rank latents; RoPE lives on separate channels
    (`qk_rope_head_dim`) whose key part is shared by all heads, so the KV latent stays position-free."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        h, d = cfg.num_heads, cfg.hidden_size
        if cfg.q_lora_rank > 0:
            self.wq_a = nn.Linear(d, cfg.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps)
            self.wq_b = nn.Linear(cfg.q_lora_rank, h * cfg.qk_head_dim, bias=False)
        else:
            self.wq = nn.Linear(d, h * cfg.qk_head_dim, bias=False)
        self.wkv_a = nn.Linear(d, cfg.kv_lora_rank + cfg.qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(cfg.kv_lora_rank, cfg.norm_eps)
        self.wkv_b = nn.Linear(cfg.kv_lora_rank, h * (cfg.qk_nope_head_dim + cfg.v_head_dim), bias=False)
        self.wo = nn.Linear(h * cfg.v_head_dim, d, bias=False)
        self.rope = RotaryEmbedding(cfg.qk_rope_head_dim, cfg.max_seq_len, cfg.rope_theta)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        q_in, kv_latent, k_rope = self.latents(x_BSD)
        out = self.up_attend(q_in, kv_latent, k_rope)
        b, s, _ = x_BSD.shape
        return self.wo(out.reshape(b, s, self.cfg.num_heads * self.cfg.v_head_dim))

    # forward is split into units that parallel/memory.py may recompute or swap separately
    def latents(self, x_BSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Down-projections: the q latent (or, without q_lora_rank, q itself), the KV latent, the rope key."""
        cfg = self.cfg
        q_in = self.wq_a(x_BSD) if cfg.q_lora_rank > 0 else self.wq(x_BSD)
        kv_latent, k_rope = self.wkv_a(x_BSD).split([cfg.kv_lora_rank, cfg.qk_rope_head_dim], dim=-1)
        return q_in, kv_latent, k_rope

    def up_attend(self, q_in: torch.Tensor, kv_latent: torch.Tensor, k_rope: torch.Tensor) -> torch.Tensor:
        """Up-projections, RoPE and the core attention: [B, S, H, v_head_dim]."""
        cfg = self.cfg
        b, s, _ = q_in.shape
        h = cfg.num_heads
        q = self.wq_b(self.q_norm(q_in)) if cfg.q_lora_rank > 0 else q_in
        q_nope, q_rope = q.view(b, s, h, cfg.qk_head_dim).split(
            [cfg.qk_nope_head_dim, cfg.qk_rope_head_dim], dim=-1)
        kv = self.wkv_b(self.kv_norm(kv_latent)).view(b, s, h, cfg.qk_nope_head_dim + cfg.v_head_dim)
        k_nope, v = kv.split([cfg.qk_nope_head_dim, cfg.v_head_dim], dim=-1)
        k_rope = self.rope(k_rope.reshape(b, s, 1, cfg.qk_rope_head_dim)).expand(b, s, h, cfg.qk_rope_head_dim)
        q = torch.cat([q_nope, self.rope(q_rope)], dim=-1)
        k = torch.cat([k_nope, k_rope], dim=-1)
        return self.core_attention(q, k, v)

    def core_attention(self, q_BSHD: torch.Tensor, k_BSHD: torch.Tensor, v_BSHD: torch.Tensor) -> torch.Tensor:
        out = F.scaled_dot_product_attention(
            q_BSHD.transpose(1, 2), k_BSHD.transpose(1, 2), v_BSHD.transpose(1, 2),
            is_causal=True, scale=1.0 / math.sqrt(self.cfg.qk_head_dim))
        return out.transpose(1, 2)


class GQA(nn.Module):
    """Grouped-query attention: `num_kv_heads` key/value heads shared by groups of query heads."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d, hd = cfg.hidden_size, cfg.head_dim
        self.wq = nn.Linear(d, cfg.num_heads * hd, bias=False)
        self.wk = nn.Linear(d, cfg.num_kv_heads * hd, bias=False)
        self.wv = nn.Linear(d, cfg.num_kv_heads * hd, bias=False)
        self.wo = nn.Linear(cfg.num_heads * hd, d, bias=False)
        self.rope = RotaryEmbedding(hd, cfg.max_seq_len, cfg.rope_theta)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        b, s, _ = x_BSD.shape
        hd, h, hkv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
        q = self.rope(self.wq(x_BSD).view(b, s, h, hd))
        k = self.rope(self.wk(x_BSD).view(b, s, hkv, hd))
        v = self.wv(x_BSD).view(b, s, hkv, hd)
        if hkv != h:
            k = k.repeat_interleave(h // hkv, dim=2)
            v = v.repeat_interleave(h // hkv, dim=2)
        return self.wo(self.core_attention(q, k, v).reshape(b, s, h * hd))

    def core_attention(self, q_BSHD: torch.Tensor, k_BSHD: torch.Tensor, v_BSHD: torch.Tensor) -> torch.Tensor:
        """A unit that parallel/memory.py may recompute or swap."""
        out = F.scaled_dot_product_attention(
            q_BSHD.transpose(1, 2), k_BSHD.transpose(1, 2), v_BSHD.transpose(1, 2), is_causal=True)
        return out.transpose(1, 2)


def build_attention(cfg: ModelConfig) -> nn.Module:
    return MLA(cfg) if cfg.attention == "mla" else GQA(cfg)
