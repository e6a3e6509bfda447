"""Weight initialisation: TinyInit (default) and a standard normal init.

TinyInit: every weight matrix ~ N(0, sqrt(1 / (2 d L))) for hidden size d and L layers, embedding
~ N(0, embed_std). With the sandwich norm, post-norm gains start at c / sqrt(L) (c differs for the
attention and MLP sublayers); every other norm gain starts at 1.

Every random parameter draws from its own generator, seeded by (`seed`, its name in the full
model). So a parameter's initial value depends on nothing else in the model: a pipeline stage that
builds only its own layers (parallel/pipeline.py) gets exactly the weights the single-process model
has, without building (or drawing the random numbers of) the layers before it.
"""
from __future__ import annotations

import hashlib
import math

import torch
from torch import nn

from moe.config import ModelConfig
from moe.layers import RMSNorm


def matrix_std(cfg: ModelConfig) -> float:
    if cfg.init == "tiny":
        return math.sqrt(1.0 / (2 * cfg.hidden_size * cfg.num_layers))
    return cfg.init_std


def draw_init_seed() -> int:
    """The model's base seed, drawn from torch's global generator: `torch.manual_seed(s)` followed
    by building a model (whole or one pipeline stage) gives the same weights every time."""
    # device="cpu": the global CPU generator, also when built under `torch.device("meta")` (HF export)
    return int(torch.randint(0, 2**62, (), dtype=torch.int64, device="cpu"))


def param_seed(seed: int, name: str) -> int:
    """A 63-bit seed for parameter `name` (stable across processes, unlike Python's str hash)."""
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _normal_(p: torch.Tensor, std: float, seed: int, name: str) -> None:
    # Drawn on the CPU in fp32, then copied: the same values on every device and dtype.
    g = torch.Generator().manual_seed(param_seed(seed, name))
    p.copy_(torch.empty(p.shape, dtype=torch.float32).normal_(0.0, std, generator=g))


@torch.no_grad()
def init_weights(model: nn.Module, cfg: ModelConfig, seed: int) -> None:
    """Initialise `model` (an MoETransformer, or a pipeline stage whose parameter names are those
    of the full model) in place from `seed`."""
    std = matrix_std(cfg)
    embed_std = cfg.embed_std if cfg.init == "tiny" else cfg.init_std
    post_gain = {"attn_post_norm": cfg.dssn_attn_c / math.sqrt(cfg.num_layers),
                 "mlp_post_norm": cfg.dssn_mlp_c / math.sqrt(cfg.num_layers)}
    for mname, module in model.named_modules():
        leaf = mname.rsplit(".", 1)[-1]
        for pname, p in module.named_parameters(recurse=False):
            name = f"{mname}.{pname}" if mname else pname
            if isinstance(module, RMSNorm):
                p.fill_(post_gain.get(leaf, 1.0))
            elif isinstance(module, nn.Embedding):
                _normal_(p, embed_std, seed, name)
            elif p.dim() >= 2:  # Linear weights, router gates, stacked expert weights
                _normal_(p, std, seed, name)
