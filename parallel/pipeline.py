"""Pipeline stages of the MoE model: per-stage construction and the code one virtual stage runs.

`PipelineModel` is what one pipeline rank holds: only its stages' modules, built and initialised
here (never the whole model), under the full model's parameter names (`layers.<i>`, `embed`,
`norm`, `head`, `mtp.<j>`). Because `moe.init` seeds every parameter from its name, those weights
equal the single-process model's with the same seed; the names also make checkpoints and the
optimizer's parameter groups layout-independent. The trainer, the gradient reducer, ZeRO-1 and
the checkpoint code see it as "the model".

`StageChunk` is one virtual stage (a chunk, in Megatron's words) over the same modules, the unit
`torch.distributed.pipelining.PipelineStage` runs. Its forward is the single-process forward's
pieces (`moe.model.ModelParts`): embedding on the first stage; blocks; on the last stage the final
norm, head, LM loss and MTP modules. MTP (and a tied head) need token embeddings on the last stage:
it keeps a copy of the embedding whose gradient is summed with the first stage's
(`embedding_copy`, as Megatron does for tied embeddings), so both copies stay identical.

Balance and z-losses of intermediate stages: the single-process loss is lm + w * mtp + sum(aux) +
sum(z), so every aux term gets gradient 1 (times the schedule's 1/micro-batches scaling, applied to
all gradients alike). A stage that does not end in the loss attaches its aux terms to the
activation it sends (`AttachAuxLoss`: identity forward; backward passes the activation gradient
through and gives the aux terms gradient 1), so they are back-propagated exactly as in one process.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from moe.block import TransformerBlock
from moe.config import ModelConfig
from moe.init import draw_init_seed, init_weights
from moe.layers import RMSNorm
from moe.model import ModelParts, MTPModule
from parallel.pipeline_layout import StagePlan


class AttachAuxLoss(torch.autograd.Function):
    """h -> h; in backward, the auxiliary loss `aux` (a scalar in the graph) receives gradient 1."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        ctx.aux_shape = aux.shape
        return h.view_as(h)

    @staticmethod
    def backward(ctx, grad_h: torch.Tensor):
        return grad_h, torch.ones(ctx.aux_shape, dtype=torch.float32, device=grad_h.device)


class PipelineModel(ModelParts, nn.Module):
    """Pipeline rank `pp_rank`'s modules (see the module docstring). `chunks` are its virtual
    stages in schedule order; they share these modules (and are not registered as children)."""

    def __init__(self, cfg: ModelConfig, kernels, plan: StagePlan, pp_rank: int):
        super().__init__()
        seed = draw_init_seed()  # first, as MoETransformer does: the same seed gives the same weights
        self.cfg, self.plan, self.pp_rank = cfg, plan, pp_rank
        stages = plan.stages_of(pp_rank)
        self.has_first = 0 in stages
        self.has_last = plan.num_stages - 1 in stages
        self.embedding_copy = self.has_last and not self.has_first and (cfg.mtp_layers > 0 or cfg.tie_embeddings)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size) if self.has_first or self.embedding_copy else None
        self.layers = nn.ModuleDict({str(i): TransformerBlock(cfg, moe=i >= cfg.first_k_dense, kernels=kernels)
                                     for s in stages for i in plan.layers[s]})
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps) if self.has_last else None
        self.head = (nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
                     if self.has_last and not cfg.tie_embeddings else None)
        self.mtp = nn.ModuleList(MTPModule(cfg, kernels) for _ in range(cfg.mtp_layers if self.has_last else 0))
        init_weights(self, cfg, seed)
        self.chunks = [StageChunk(self, s) for s in stages]  # a plain list: not registered

    def train(self, mode: bool = True) -> "PipelineModel":
        super().train(mode)
        for chunk in self.chunks:  # not children: their own flag follows by hand
            chunk.training = mode
        return self

    def forward(self, *args, **kwargs):
        raise RuntimeError("PipelineModel: a pipeline rank's model runs through its schedule "
                           "(parallel/pipeline_schedule.py), not as one module")

    def param_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())

    def moe_layer_index(self) -> list[int]:
        """For each of this rank's MoE layers (moe_layers() order), its index among the full
        model's MoE layers (blocks first, then MTP modules)."""
        cfg = self.cfg
        out = [int(i) - cfg.first_k_dense for i, b in self.layers.items() if b.is_moe]
        out += [cfg.num_moe_layers + j for j, m in enumerate(self.mtp) if m.block.is_moe]
        return out


class StageChunk(ModelParts, nn.Module):
    """Virtual stage `stage` of `owner`'s plan. forward(x, tokens, labels, loss_mask): x is the
    token ids on the first stage, the previous stage's hidden states elsewhere; returns the hidden
    states, or on the last stage the micro-batch's loss. Per micro-batch it records the detached
    loss terms it computed (`records`) and sums its MoE layers' routing load (`load`)."""

    def __init__(self, owner: PipelineModel, stage: int):
        super().__init__()
        plan, cfg = owner.plan, owner.cfg
        self.cfg, self.stage = cfg, stage
        self.is_first, self.is_last = stage == 0, stage == plan.num_stages - 1
        self.embed = owner.embed if self.is_first or (self.is_last and owner.embedding_copy) else None
        self.layers = nn.ModuleList(owner.layers[str(i)] for i in plan.layers[stage])
        self.norm = owner.norm if self.is_last else None
        self.head = owner.head if self.is_last else None
        self.mtp = owner.mtp if self.is_last else nn.ModuleList()
        self.records: list[dict[str, float]] = []
        self.load: list[torch.Tensor] = []

    def reset_step(self) -> None:
        self.records = []
        self.load = [torch.zeros_like(m.routing_load()) for m in self.moe_layers()]

    def forward(self, x: torch.Tensor, tokens: torch.Tensor, labels: Optional[torch.Tensor] = None,
                loss_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        aux_losses, z_losses = [], []
        h = self.embed_tokens(x) if self.is_first else x
        h = self.run_layers(self.layers, h, aux_losses, z_losses)
        rec: dict[str, float] = {}
        if self.is_last:
            emb = self.embed_tokens(tokens) if len(self.mtp) else None
            _, lm_loss, mtp_loss = self.output_losses(h, emb, tokens, labels, loss_mask, aux_losses, z_losses)
            rec.update(lm_loss=float(lm_loss.detach()), mtp_loss=float(mtp_loss.detach()))
        zero = h.new_zeros((), dtype=torch.float32)
        aux = torch.stack(aux_losses).sum() if aux_losses else zero
        z = torch.stack(z_losses).sum() if z_losses else zero
        rec.update(aux_loss=float(aux.detach()), z_loss=float(z.detach()))
        self.records.append(rec)
        if self.training:
            for acc, m in zip(self.load, self.moe_layers()):
                acc += m.routing_load()
        if self.is_last:
            return lm_loss + self.cfg.mtp_loss_weight * mtp_loss + aux + z
        if aux_losses and torch.is_grad_enabled():
            h = AttachAuxLoss.apply(h, aux + z)
        return h
