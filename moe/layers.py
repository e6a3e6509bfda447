"""Small building blocks shared by attention, dense and expert layers: RMSNorm, SwiGLU MLP, RoPE."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32: bf16 sums of squares lose too much precision for deep models.
        x32 = x.float()
        y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


class SwiGLU(nn.Module):
    """Dense gated MLP: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, ffn_size: int):
        super().__init__()
        self.w1 = nn.Linear(dim, ffn_size, bias=False)
        self.w3 = nn.Linear(dim, ffn_size, bias=False)
        self.w2 = nn.Linear(ffn_size, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act_down(*self.gate_up(x))

    def gate_up(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two up-projections (the MoE layer overlaps them with the token dispatch)."""
        return self.w1(x), self.w3(x)

    def act_down(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The activation and down-projection: a unit that parallel/memory.py may recompute."""
        return self.w2(F.silu(a) * b)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding tables (rotate-half convention) for `dim` channels."""

    def __init__(self, dim: int, max_seq_len: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """x: [B, S, H, dim] -> same shape, rotated by position."""
        seq = x.shape[1]
        cos = self.cos[offset:offset + seq].repeat(1, 2)[None, :, None, :]
        sin = self.sin[offset:offset + seq].repeat(1, 2)[None, :, None, :]
        x1, x2 = x.float().chunk(2, dim=-1)
        rotated = torch.cat((-x2, x1), dim=-1)
        return (x.float() * cos + rotated * sin).to(x.dtype)
