"""Sequence parallelism: with TP, the work outside the TP regions split over the TP group by tokens.

Without it every TP rank holds the whole micro-batch outside the TP regions (residual stream,
norms, router) and computes the same thing there. With `parallel.sequence_parallel`, inside the
transformer layers of `model.layers`:

- the residual stream and the norms hold this rank's S / tp positions of every sequence (TP rank r:
  positions [r * S / tp, (r + 1) * S / tp); train.seq_len must divide by tp);
- an attention region gathers its input along the sequence (`gather_sequence`: all-gather forward,
  reduce-scatter backward) and reduce-scatters its output back to this rank's positions
  (`scatter_sequence`: reduce-scatter forward, all-gather backward), Megatron's f and g;
- a SwiGLU region (dense MLP, shared expert) does the same over rows (`gather_rows` /
  `scatter_rows`): an MLP treats tokens one by one, so the gathered rows may come in rank order;
- the MoE layer routes this rank's tokens: `token_reducer` (set on each router here) sums the
  router's statistics over the TP group, so the balance losses, z-loss and expert-load counts are
  those of the whole micro-batch, as without sequence parallelism; the dispatcher either gathers the
  tokens over TP before the EP exchange (expert TP: each TP rank holds a slice of every expert) or
  dispatches them as they are (TP-extend-EP: whole experts over the ep x tp ranks);
- norm weights and the router see only this rank's tokens, so their gradients are partial sums over
  TP (returned as `partial`, summed by the gradient reducer).

The first pipeline stage splits the embeddings by position and the last joins the hidden states
(`split_sequence` / `join_sequence`: a slice forward, an all-gather in backward, and the reverse),
so the embedding, the head and the MTP modules see whole sequences, and the stages in between send
each other their positions only (parallel/pipeline_schedule.py `seq_shards`). MTP blocks keep the
plain TP regions (their S - depth positions do not split evenly over the ranks).

A TP region's input projections save this rank's part of the gathered input and all-gather it
again in backward (`_Regather`), so the gathered activations are not kept either.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from parallel import comm
from parallel import emulated_links as links
from parallel.method_wrap import wrap_outer
from parallel.tp_comm import _gather_rows, gather_from_tp, reduce_from_tp, split_to_tp


def _rows_of(x: Tensor, group) -> list[int]:
    return [x.shape[0]] * dist.get_world_size(group)  # every rank holds the same shape (even split)


def gather_rows(x: Tensor, group) -> Tensor:
    """Every TP rank's rows concatenated (dim 0); backward: reduce-scatter of the partial gradients."""
    return comm.all_gather(x, _rows_of(x, group), group)


def scatter_rows(x: Tensor, group) -> Tensor:
    """This rank's block of rows, summed over the TP ranks' partial values; backward: all-gather."""
    n = dist.get_world_size(group)
    return comm.reduce_scatter(x, [x.shape[0] // n] * n, group)


def gather_sequence(x_BSD: Tensor, group) -> Tensor:
    """[B, S / tp, D] on each rank -> [B, S, D] (positions in rank order); backward reduce-scatters."""
    return gather_rows(x_BSD.transpose(0, 1), group).transpose(0, 1).contiguous()


def scatter_sequence(x_BSD: Tensor, group) -> Tensor:
    """[B, S, D] partial sums -> this rank's [B, S / tp, D] of their sum; backward all-gathers."""
    return scatter_rows(x_BSD.transpose(0, 1), group).transpose(0, 1)


def _positions_split(x_BSD: Tensor, group) -> int:
    n = dist.get_world_size(group)
    if x_BSD.shape[1] % n:
        raise ValueError(f"sequence parallelism: a sequence of {x_BSD.shape[1]} positions does not split evenly "
                         f"over tp={n} ranks; set train.seq_len to a multiple of tp, or sequence_parallel: false")
    return n


def split_sequence(x_BSD: Tensor, group) -> Tensor:
    """This rank's positions of sequences every TP rank holds whole; backward all-gathers them
    (tp_comm's split along the sequence)."""
    _positions_split(x_BSD, group)
    return split_to_tp(x_BSD.transpose(0, 1), group).transpose(0, 1).contiguous()


def join_sequence(x_BSD: Tensor, group) -> Tensor:
    """The whole sequences from every rank's positions; backward keeps this rank's positions (the
    gradient of what follows is the same on every TP rank)."""
    n = dist.get_world_size(group)
    return gather_from_tp(x_BSD.transpose(0, 1), n * x_BSD.shape[1], group).transpose(0, 1).contiguous()


def in_split_layers(name: str) -> bool:
    """Whether module `name` of a model belongs to the main layers, which sequence parallelism
    splits (the MTP modules, the embedding and the head see whole sequences)."""
    return name.startswith("layers.")


class _Regather:
    """A TP region's gathered input as its input projections save it for backward: only this
    rank's part is kept (and counted by the step's memory tracker); the first projection whose
    backward needs it all-gathers it again, and the others reuse that copy (Megatron keeps the
    sequence-parallel inputs of its column-parallel layers the same way)."""

    __slots__ = ("part", "regather", "full", "held")

    def __init__(self, part: Tensor, regather):
        from parallel.memory import SavedTracker
        self.part, self.regather, self.full = part, regather, None
        tracker = SavedTracker.active
        self.held = tracker.pack(part) if tracker is not None else None

    def get(self) -> Tensor:
        if self.full is None:
            with torch.no_grad():
                self.full = self.regather(self.part)
        return self.full


class _RegionInput:
    """Per TP region under sequence parallelism: gathers its input (`enter`) and keeps the gathered
    tensor out of the saved activations of its input projections (`projection`)."""

    def __init__(self, group, along_sequence: bool):
        self.group, self.along_sequence = group, along_sequence
        self.current: dict[int, _Regather] = {}  # storage of this forward's gathered input -> its part

    def _regather(self, part: Tensor) -> Tensor:
        sizes = [part.shape[1 if self.along_sequence else 0]] * dist.get_world_size(self.group)
        if self.along_sequence:
            return _gather_rows(part.transpose(0, 1), sizes, self.group).transpose(0, 1).contiguous()
        return _gather_rows(part, sizes, self.group)

    def enter(self, x: Tensor) -> Tensor:
        full = (gather_sequence if self.along_sequence else gather_rows)(x, self.group)
        self.current = {full.untyped_storage().data_ptr(): _Regather(x.detach(), self._regather)}
        return full

    def leave(self) -> None:
        self.current = {}

    def _pack(self, t: Tensor):
        ref = self.current.get(t.untyped_storage().data_ptr())
        if ref is None:
            return t
        return ref, t.size(), t.stride(), t.storage_offset()

    @staticmethod
    def _unpack(h):
        if isinstance(h, Tensor):
            return h
        ref, size, stride, offset = h
        return ref.get().as_strided(size, stride, offset)

    def projection(self, inner, x: Tensor) -> Tensor:
        """An input projection's forward (a Linear of the region's gathered input)."""
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            return inner(x)


def region_input(module: nn.Module, group, along_sequence: bool) -> _RegionInput:
    """The sequence-parallel input of TP region `module`, with its input projections wrapped."""
    from moe.attention import GQA, MLA
    from moe.layers import SwiGLU
    region = _RegionInput(group, along_sequence)
    if isinstance(module, MLA):
        names = ["wq_a" if module.cfg.q_lora_rank > 0 else "wq", "wkv_a"]
    elif isinstance(module, GQA):
        names = ["wq", "wk", "wv"]
    elif isinstance(module, SwiGLU):
        names = ["w1", "w3"]
    else:
        raise TypeError(f"no sequence-parallel input projections for {type(module).__name__}")
    for name in names:
        wrap_outer(getattr(module, name), "forward", region.projection)
    return region


def token_reducer(group):
    """The routers' `token_reducer`: sums a statistic over the TP group. Differentiable with the
    identity backward (every rank computes the same loss from the sum, so the gradient arriving at
    this rank's share is already the whole one)."""
    def reduce(t: Tensor) -> Tensor:
        if t.requires_grad:
            return reduce_from_tp(t, group)
        t = t.clone()
        links.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        return t
    return reduce


def apply_sequence_parallel(model: nn.Module, group) -> list[str]:
    """Split the layers of `model` (a whole model or this rank's pipeline stages) by sequence as the
    module docstring says; the TP regions must be installed already (apply_tensor_parallel with
    sequence_parallel=True). Returns the parameters whose gradients become partial over TP."""
    from moe.block import TransformerBlock
    from moe.layer import MoELayer
    from moe.layers import RMSNorm
    from moe.model import ModelParts

    partial = []
    for name, module in model.named_modules():
        if not in_split_layers(name):
            continue
        if isinstance(module, TransformerBlock):
            for child, sub in module.named_children():
                if isinstance(sub, RMSNorm):
                    partial.append(f"{name}.{child}.weight")
        if isinstance(module, MoELayer):
            module.router.token_reducer = token_reducer(group)
            partial.append(f"{name}.router.weight")
    for part in [*model.modules(), *getattr(model, "chunks", [])]:
        if isinstance(part, ModelParts):
            wrap_outer(part, "run_layers", _chunk_ends(getattr(part, "is_first", True), getattr(part, "is_last", True),
                                                       group))
    return partial


def _chunk_ends(first: bool, last: bool, group):
    """run_layers of one model part: the first stage splits the embeddings by position, the last
    joins the hidden states for the head; stages between send and receive their positions only."""
    def run(inner, layers, h, *rest):
        h = inner(layers, split_sequence(h, group) if first else h, *rest)
        return join_sequence(h, group) if last else h
    return run
