"""One transformer layer: attention and a feed-forward sublayer (dense SwiGLU or MoE), each wrapped
in a depth-scaled sandwich norm (h + post_norm(f(pre_norm(h)))) or a plain pre-norm (h + f(norm(h)))."""
from __future__ import annotations

import torch
from torch import nn

from moe.attention import build_attention
from moe.config import ModelConfig
from moe.layer import MoELayer
from moe.layers import RMSNorm, SwiGLU


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, moe: bool, kernels):
        super().__init__()
        self.is_moe = moe
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attn = build_attention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = MoELayer(cfg, kernels) if moe else SwiGLU(cfg.hidden_size, cfg.dense_ffn_size)
        sandwich = cfg.norm == "sandwich"
        self.attn_post_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps) if sandwich else nn.Identity()
        self.mlp_post_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps) if sandwich else nn.Identity()

    def forward(self, h_BSD: torch.Tensor) -> tuple[torch.Tensor, dict]:
        h_BSD = h_BSD + self.attn_post_norm(self.attn(self.attn_norm(h_BSD)))
        if self.is_moe:
            y, aux = self.mlp(self.mlp_norm(h_BSD))
        else:
            y, aux = self.mlp(self.mlp_norm(h_BSD)), {}
        return h_BSD + self.mlp_post_norm(y), aux
