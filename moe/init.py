"""Weight initialisation: TinyInit (default) and a standard normal init.

TinyInit: every weight matrix ~ N(0, sqrt(1 / (2 d L))) for hidden size d and L layers, embedding
~ N(0, embed_std). With the sandwich norm, post-norm gains start at c / sqrt(L) (c differs for the
attention and MLP sublayers); every other norm gain starts at 1.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from moe.config import ModelConfig
from moe.layers import RMSNorm


def matrix_std(cfg: ModelConfig) -> float:
    if cfg.init == "tiny":
        return math.sqrt(1.0 / (2 * cfg.hidden_size * cfg.num_layers))
    return cfg.init_std


@torch.no_grad()
def init_weights(model: nn.Module, cfg: ModelConfig) -> None:
    """Initialise `model` (an MoETransformer) in place. Parameter order is fixed by module order,
    so the same seed gives the same weights on every device and every parallel layout."""
    std = matrix_std(cfg)
    embed_std = cfg.embed_std if cfg.init == "tiny" else cfg.init_std
    post_gain = {"attn_post_norm": cfg.dssn_attn_c / math.sqrt(cfg.num_layers),
                 "mlp_post_norm": cfg.dssn_mlp_c / math.sqrt(cfg.num_layers)}
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, RMSNorm):
            module.weight.fill_(post_gain.get(leaf, 1.0))
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, embed_std)
        elif isinstance(module, nn.Linear):
            module.weight.normal_(0.0, std)
        for pname, p in module.named_parameters(recurse=False):
            if p.dim() >= 2 and not isinstance(module, (nn.Linear, nn.Embedding)):
                p.normal_(0.0, std)  # router gate and stacked expert weights
