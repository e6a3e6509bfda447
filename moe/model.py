"""The MoE language model: embedding, transformer blocks (first_k_dense dense, then MoE), final norm,
output head, and DeepSeek-V3-style multi-token-prediction (MTP) modules, with the training loss.

`noop_layers` (identity layers that pad the depth for pipeline balance) add no modules here: on one
device an identity layer is nothing; the pipeline wrapper accounts for them.

The forward is three pieces (`embed_tokens`, `run_layers`, `output_losses`) so that a pipeline stage
(parallel/pipeline.py), which holds some of these modules under the same names, runs exactly the
code of the single-process model.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from moe.block import TransformerBlock
from moe.config import ModelConfig
from moe.init import draw_init_seed, init_weights
from moe.layer import MoELayer
from moe.layers import RMSNorm


class MTPModule(nn.Module):
    """Predicts the token `depth + 1` positions ahead: combines the previous depth's hidden state at
    position i with the embedding of token i + depth, runs one transformer block, then the shared head."""

    def __init__(self, cfg: ModelConfig, kernels):
        super().__init__()
        self.hidden_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.embed_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.block = TransformerBlock(cfg, moe=cfg.num_moe_layers > 0, kernels=kernels)
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)

    def forward(self, h_prev_BSD: torch.Tensor, emb_ahead_BSD: torch.Tensor) -> tuple[torch.Tensor, dict]:
        x = self.proj(torch.cat([self.hidden_norm(h_prev_BSD), self.embed_norm(emb_ahead_BSD)], dim=-1))
        return self.block(x)


@dataclass
class ModelOutput:
    loss: torch.Tensor  # what backward() runs on: lm + mtp + aux + z
    lm_loss: torch.Tensor
    aux_loss: torch.Tensor
    z_loss: torch.Tensor
    mtp_loss: torch.Tensor
    logits: Optional[torch.Tensor] = None
    extras: dict = field(default_factory=dict)


class ModelParts:
    """What the whole model and a pipeline stage share: they hold `embed`, `layers`, `norm`, `head`
    and `mtp` (a stage only some of them, the others None) under the full model's names."""

    cfg: ModelConfig

    def logits(self, h_BSD: torch.Tensor) -> torch.Tensor:
        weight = self.embed.weight if self.head is None else self.head.weight
        return F.linear(h_BSD, weight.to(h_BSD.dtype))

    @staticmethod
    def token_losses(logits_NV: torch.Tensor, labels_N: torch.Tensor) -> torch.Tensor:
        """Per-token cross-entropy in fp32 (parallel/vocab_parallel.py replaces it for split logits)."""
        return F.cross_entropy(logits_NV.float(), labels_N, reduction="none")

    def lm_loss(self, logits_BSV: torch.Tensor, labels_BS: torch.Tensor,
                mask_BS: Optional[torch.Tensor]) -> torch.Tensor:
        """Mean token loss over the unmasked tokens."""
        losses = self.token_losses(logits_BSV.flatten(0, 1), labels_BS.flatten())
        if mask_BS is None:
            return losses.mean()
        mask = mask_BS.flatten().float()
        return (losses * mask).sum() / mask.sum().clamp(min=1.0)

    def moe_layers(self) -> list[MoELayer]:
        return [m for m in self.modules() if isinstance(m, MoELayer)]

    def embed_tokens(self, tokens_BS: torch.Tensor) -> torch.Tensor:
        return self.embed(tokens_BS)

    @staticmethod
    def run_layers(layers, h: torch.Tensor, aux_losses: list, z_losses: list) -> torch.Tensor:
        """Blocks in order; each MoE block's balance and z-losses are appended to the lists."""
        for layer in layers:
            h, aux = layer(h)
            if aux:
                aux_losses.append(aux["aux_loss"])
                z_losses.append(aux["z_loss"])
        return h

    def output_losses(self, h: torch.Tensor, emb_BSD: torch.Tensor, tokens_BS: torch.Tensor,
                      labels_BS: Optional[torch.Tensor], loss_mask_BS: Optional[torch.Tensor],
                      aux_losses: list, z_losses: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Final norm, head, LM loss and the MTP modules (their MoE losses appended to the lists):
        (logits, lm_loss, mtp_loss)."""
        logits = self.logits(self.norm(h))
        zero = logits.new_zeros((), dtype=torch.float32)
        lm_loss = mtp_loss = zero
        if labels_BS is not None:
            lm_loss = self.lm_loss(logits, labels_BS, loss_mask_BS)
            mtp_losses = []
            seq = tokens_BS.shape[1]
            for depth, module in enumerate(self.mtp, start=1):
                if depth >= seq:
                    break
                h, aux = module(h[:, : seq - depth], emb_BSD[:, depth:])
                if aux:
                    aux_losses.append(aux["aux_loss"])
                    z_losses.append(aux["z_loss"])
                mask = loss_mask_BS[:, depth:] if loss_mask_BS is not None else None
                mtp_losses.append(self.lm_loss(self.logits(module.norm(h)), labels_BS[:, depth:], mask))
            if mtp_losses:
                mtp_loss = torch.stack(mtp_losses).mean()
        return logits, lm_loss, mtp_loss

    @torch.no_grad()
    def update_expert_bias(self) -> None:
        for layer in self.moe_layers():
            layer.router.update_bias()

    def discard_pending_load(self) -> None:
        """Drop every router's counts since the last bias update (after a skipped step)."""
        for layer in self.moe_layers():
            layer.router.discard_pending_load()


class MoETransformer(ModelParts, nn.Module):
    def __init__(self, cfg: ModelConfig, kernels=None):
        super().__init__()
        seed = draw_init_seed()  # first, so the global generator's state alone decides the weights
        if kernels is None:
            from moe_kernels import get_kernels
            kernels = get_kernels("auto")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            TransformerBlock(cfg, moe=i >= cfg.first_k_dense, kernels=kernels) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.mtp = nn.ModuleList(MTPModule(cfg, kernels) for _ in range(cfg.mtp_layers))
        init_weights(self, cfg, seed)

    def forward(self, tokens_BS: torch.Tensor, labels_BS: Optional[torch.Tensor] = None,
                loss_mask_BS: Optional[torch.Tensor] = None, return_logits: bool = False) -> ModelOutput:
        emb_BSD = self.embed_tokens(tokens_BS)
        aux_losses, z_losses = [], []
        h = self.run_layers(self.layers, emb_BSD, aux_losses, z_losses)
        logits, lm_loss, mtp_loss = self.output_losses(h, emb_BSD, tokens_BS, labels_BS, loss_mask_BS,
                                                       aux_losses, z_losses)
        zero = logits.new_zeros((), dtype=torch.float32)
        aux_loss = torch.stack(aux_losses).sum() if aux_losses else zero
        z_loss = torch.stack(z_losses).sum() if z_losses else zero
        loss = lm_loss + self.cfg.mtp_loss_weight * mtp_loss + aux_loss + z_loss
        return ModelOutput(loss, lm_loss, aux_loss, z_loss, mtp_loss, logits if return_logits else None)

