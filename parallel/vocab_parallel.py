"""Vocabulary parallelism: the embedding, the output head and the cross-entropy split over the TP group.

With `parallel.vocab_parallel` (the default) and tp > 1, TP rank r keeps rows
[r * V / tp, (r + 1) * V / tp) of the embedding and of the output head (one slice serves both when
they are tied), so the vocabulary (153,600 entries for Pangu) is not replicated on every TP rank, and
neither are the logits, the largest activation of the step:

- embedding: each rank looks up the tokens inside its slice (zeros elsewhere) and the partial
  embeddings are summed over the group (`reduce_from_tp`). Exactly one rank contributes a
  non-zero row per token, so the sum equals the full lookup bitwise.
- head: `copy_to_tp` on its input (backward sums the ranks' partial input gradients), then this
  rank's slice of the logits.
- cross-entropy on the sliced logits: the row maximum (all-reduce MAX), then the sum of
  exponentials and the target's logit (one all-reduce SUM), so every rank computes the same full
  losses. Backward needs no collective: the gradient of rank r's logits is its slice of
  softmax - one-hot(target), from the softmax kept in forward. Labels -100 are ignored as
  F.cross_entropy ignores them.

The model's `logits` and `token_losses` methods (moe/model.py `ModelParts`) are replaced on each
instance, so the model code and parameter names stay those of `moe/`; the parameters' `Shard`s go
into the TP plan (checkpoints, gradient norm).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from parallel import emulated_links as links
from parallel.layout import Shard, take_shard
from parallel.tp_comm import copy_to_tp, reduce_from_tp

IGNORE_INDEX = -100  # F.cross_entropy's default


def _split_rows(weight: nn.Parameter, shard: Shard) -> nn.Parameter:
    return nn.Parameter(take_shard(weight.detach(), (shard,)).clone(), requires_grad=weight.requires_grad)


def _embedding_forward(embed: nn.Embedding, lo: int, group):
    def forward(tokens: torch.Tensor) -> torch.Tensor:
        local = tokens - lo
        outside = (local < 0) | (local >= embed.num_embeddings)
        rows = F.embedding(local.masked_fill(outside, 0), embed.weight)
        return reduce_from_tp(rows.masked_fill(outside.unsqueeze(-1), 0.0), group)
    return forward


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Keeps only the fp32 softmax of this rank's columns for backward (d loss / d logit =
    softmax - one-hot(target)), as F.cross_entropy keeps its log-softmax: V / tp values a token."""

    @staticmethod
    def forward(ctx, logits_NV, labels_N, lo, group):
        x = logits_NV.float()
        row_max = x.amax(-1, keepdim=True)
        links.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        local = labels_N - lo
        outside = (local < 0) | (local >= x.shape[-1])
        index = local.masked_fill(outside, 0).unsqueeze(-1)
        softmax = (x - row_max).exp_()
        sums = torch.stack([softmax.sum(-1), (x.gather(-1, index) - row_max).squeeze(-1).masked_fill(outside, 0.0)])
        links.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)  # [sum of exponentials, target logit]
        ignored = labels_N == IGNORE_INDEX
        softmax.div_(sums[0].unsqueeze(-1))
        ctx.save_for_backward(softmax, index, outside, ignored)
        ctx.dtype = logits_NV.dtype
        return (sums[0].log() - sums[1]).masked_fill(ignored, 0.0)

    @staticmethod
    def backward(ctx, grad_N):
        softmax, index, outside, ignored = ctx.saved_tensors
        g = grad_N.float().masked_fill(ignored, 0.0)
        grad = softmax * g.unsqueeze(-1)
        grad.scatter_add_(-1, index, -g.masked_fill(outside, 0.0).unsqueeze(-1))
        return grad.to(ctx.dtype), None, None, None


def vocab_parallel_token_losses(logits_NV: torch.Tensor, labels_N: torch.Tensor, lo: int, group) -> torch.Tensor:
    """Per-token cross-entropy of logits split over the vocabulary: `logits_NV` holds columns
    [lo, lo + V_local) of the full logits on this rank. Returns the full losses on every rank."""
    return _VocabParallelCrossEntropy.apply(logits_NV, labels_N, lo, group)


def apply_vocab_parallel(model: nn.Module, group, rank: int, tp: int) -> dict[str, tuple[Shard, ...]]:
    """Split the embedding and head of `model` (a whole model or this rank's pipeline stages) over
    the TP group in place; returns the split parameters' shards by name."""
    from moe.model import ModelParts

    shards: dict[str, tuple[Shard, ...]] = {}
    embed, head = getattr(model, "embed", None), getattr(model, "head", None)
    vocab = model.cfg.vocab_size
    lo, rows = rank * (vocab // tp), Shard(0, rank, tp)  # vocabulary rows of the weights
    if embed is not None:
        embed.weight = _split_rows(embed.weight, rows)
        embed.num_embeddings = vocab // tp
        embed.forward = _embedding_forward(embed, lo, group)
        shards["embed.weight"] = (rows,)
    if head is not None:
        head.weight = _split_rows(head.weight, rows)
        head.out_features = vocab // tp
        shards["head.weight"] = (rows,)
    # a pipeline rank's virtual stages are ModelParts of their own, not registered as children
    for part in [*model.modules(), *getattr(model, "chunks", [])]:
        if isinstance(part, ModelParts):
            part.logits = _logits(part, group)
            part.token_losses = lambda logits, labels: vocab_parallel_token_losses(logits, labels, lo, group)
    return shards


def _logits(part, group):
    def logits(h_BSD: torch.Tensor) -> torch.Tensor:
        weight = part.embed.weight if part.head is None else part.head.weight
        return F.linear(copy_to_tp(h_BSD, group), weight.to(h_BSD.dtype))
    return logits
