"""What a training checkpoint holds, as layout-independent logical tensors, and which blocks of each
one this rank owns. `launch/checkpoint/checkpointer.py` decides where and when it is written.

Every entry of the DCP state dict is a *logical* tensor whose shape does not depend on the parallel
layout, so a checkpoint written under one layout loads under any other (DCP reads, for each rank,
the overlap of the stored blocks with the blocks that rank needs):

    model/<fqn>               the parameter or persistent buffer at full size (expert stacks [E, D, F])
    optim/<fqn>/<name>        per-element optimizer state (AdamW's exp_avg, exp_avg_sq), in the full
                              parameter's shape
    optim/<fqn>/step          scalar state, replicated
    rng/rank<r>/torch|host|device   this rank's random-number-generator states

Where a rank's part sits comes from `ParallelRuntime.shards` (name -> `Shard(dim, index, parts)`
splits, applied in order: expert rows over EP ranks, FFN columns over expert-TP ranks, attention
heads and MLP rows or columns over TP ranks). A parameter's local tensor is then one block of the
full tensor. A ZeRO-1 shard is a contiguous range of the *flattened* local parameter, which is
not a block; `flat_range_blocks` cuts it into at most 2 x ndim - 1 blocks that are each contiguous
in memory, so every piece of state is a rectangle of the full tensor. `Blocks` carries a rank's
rectangles of one tensor through DCP's planners; replicated entries are plain tensors, which DCP
writes once. Optimizer states are created before loading by one zero-learning-rate step on zero
gradients, so the optimizer's own code builds them (right dtype, device, fused-kernel layout).
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Iterator, Mapping

import numpy as np
import torch
from torch import nn
from torch.distributed.checkpoint import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import LoadPlan, TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from parallel.zero import ZeroOptimizer


@dataclass
class Blocks:
    """This rank's rectangles of a logical tensor of `global_shape`: offsets -> local tensor."""

    global_shape: torch.Size
    blocks: dict[torch.Size, torch.Tensor] = field(default_factory=dict)

    def add(self, offsets, local: torch.Tensor) -> "Blocks":
        self.blocks[torch.Size(offsets)] = local
        return self

    def size(self) -> torch.Size:
        return self.global_shape

    def chunks(self) -> list[ChunkStorageMetadata]:
        return [ChunkStorageMetadata(offsets=o, sizes=t.size()) for o, t in self.blocks.items()]

    def local(self, index: MetadataIndex) -> torch.Tensor:
        return self.blocks[torch.Size(index.offset)]

    # DCP's extension protocol (what DTensor implements): one write item per block.
    def __create_write_items__(self, fqn: str, obj) -> list[WriteItem]:
        return [WriteItem(index=MetadataIndex(fqn, c.offsets), type=WriteItemType.SHARD,
                          tensor_data=TensorWriteData(chunk=c, properties=TensorProperties.create_from_tensor(t),
                                                      size=self.global_shape))
                for c, t in zip(self.chunks(), self.blocks.values())]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return self.chunks()


class SavePlanner(DefaultSavePlanner):
    """DefaultSavePlanner that also resolves `Blocks` entries (a flat state dict: no flattening)."""

    def __init__(self):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def lookup_object(self, index: MetadataIndex):
        obj = self.state_dict.get(index.fqn)
        return obj.local(index) if isinstance(obj, Blocks) else super().lookup_object(index)


class LoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner that reads `Blocks` entries: the stored pieces overlapping each of this
    rank's blocks are copied straight into the block's tensor (a view of the live tensor)."""

    def __init__(self):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def set_up_planner(self, state_dict, metadata=None, is_coordinator: bool = False) -> None:
        # DCP's state-dict walker drops objects it does not know, so blocks are kept aside.
        self.blocks = {k: v for k, v in state_dict.items() if isinstance(v, Blocks)}
        plain = {k: v for k, v in state_dict.items() if not isinstance(v, Blocks)}
        super().set_up_planner(plain, metadata, is_coordinator)

    def create_local_plan(self) -> LoadPlan:
        plan = super().create_local_plan()
        items = list(plan.items)
        for fqn, b in self.blocks.items():
            md = self.metadata.state_dict_metadata[fqn]  # presence and size are checked beforehand
            items += create_read_items_for_chunk_list(fqn, md, b.chunks())
        return LoadPlan(items)

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        b = self.blocks.get(index.fqn)
        return b.local(index) if b is not None else super().lookup_tensor(index)


def flat_range_blocks(shape, a: int, b: int) -> list[tuple[tuple, tuple]]:
    """Elements [a, b) of a row-major tensor of `shape`, as (offsets, sizes) rectangles in order,
    each contiguous in memory."""
    if a >= b:
        return []
    if len(shape) <= 1:
        return [((a,), (b - a,))]
    inner = math.prod(shape[1:])
    out = []
    row = a // inner
    if a % inner:  # the tail of a partial first row
        end = min(b, (row + 1) * inner)
        out += [((row, *o), (1, *z)) for o, z in flat_range_blocks(shape[1:], a - row * inner, end - row * inner)]
        a, row = end, row + 1
    last = b // inner
    if last > row and a < b:  # whole rows
        out.append(((row,) + (0,) * (len(shape) - 1), (last - row, *shape[1:])))
        a = last * inner
    if a < b:  # the head of a partial last row
        out += [((last, *o), (1, *z)) for o, z in flat_range_blocks(shape[1:], a - last * inner, b - last * inner)]
    return out


# --- where this rank's parameters sit in the full model ---------------------------------------

@dataclass(frozen=True)
class Placement:
    global_shape: torch.Size
    offsets: tuple  # of this rank's block inside the full tensor


def placements(model: nn.Module, shards: Mapping[str, tuple] = MappingProxyType({})) -> dict[str, Placement]:
    """Full shape and block offsets of every parameter and persistent buffer of `model` on this
    rank, from the runtime's `shards` (splits applied in order, as parallel.layout.take_shard);
    without shards, the model is the full one."""
    out = {}
    for name, t in list(model.named_parameters()) + list(_persistent_buffers(model)):
        full = list(t.shape)
        for s in shards.get(name, ()):
            full[s.dim] *= s.parts
        offsets, cur = [0] * t.dim(), list(full)
        for s in shards.get(name, ()):
            cur[s.dim] //= s.parts
            offsets[s.dim] += s.index * cur[s.dim]
        out[name] = Placement(torch.Size(full), tuple(offsets))
    return out


def _persistent_buffers(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The buffers a state dict holds (the persistent ones), in module order."""
    persistent = set(model.state_dict(keep_vars=True))
    for name, buf in model.named_buffers():
        if name in persistent:
            yield name, buf


def _entry(local: torch.Tensor, pl: Placement):
    """A whole local tensor: plain when it is the full tensor (replicated), else one block."""
    if pl.global_shape == local.shape:
        return local
    return Blocks(pl.global_shape).add(pl.offsets, local)


def model_entries(model: nn.Module, place: dict[str, Placement]) -> dict[str, object]:
    return {f"model/{name}": _entry(t.detach(), place[name])
            for name, t in list(model.named_parameters()) + list(_persistent_buffers(model))}


# --- optimizer state ----------------------------------------------------------------------------

def _torch_optimizer(optimizer) -> torch.optim.Optimizer:
    return optimizer.inner if isinstance(optimizer, ZeroOptimizer) else optimizer


def ensure_state(optimizer) -> None:
    """Create missing optimizer states as the optimizer itself would: one step with learning rate 0
    and zero gradients on the parameters without state (the others get no gradient, so the step
    skips them). AdamW then changes no parameter (decay multiplies by 1 - 0 * wd, the update is
    0 * m / (sqrt(v) + eps)); the new step counters go back to 0 so the next real step is step 1."""
    opt = _torch_optimizer(optimizer)
    params = [p for g in opt.param_groups for p in g["params"]]
    missing = [p for p in params if not opt.state.get(p)]
    if not missing:
        return
    saved_grads = [p.grad for p in params]
    saved_lr = [g["lr"] for g in opt.param_groups]
    for p in params:
        p.grad = None
    for p in missing:
        p.grad = torch.zeros_like(p)
    for g in opt.param_groups:
        g["lr"] = 0.0
    try:
        opt.step()
    finally:
        for g, lr in zip(opt.param_groups, saved_lr):
            g["lr"] = lr
        for p, grad in zip(params, saved_grads):
            p.grad = grad
    for p in missing:
        step = opt.state[p].get("step")
        if torch.is_tensor(step):
            step.zero_()
        elif step is not None:
            opt.state[p]["step"] = 0


def _state_items(state: dict) -> Iterator[tuple[str, torch.Tensor]]:
    for k, v in state.items():
        if not torch.is_tensor(v):
            raise TypeError(f"optimizer state {k!r} is a {type(v).__name__}; only tensors are checkpointed")
        yield k, v


def _zero_entries(names: dict[int, str], optimizer: ZeroOptimizer, place: dict[str, Placement]) -> dict[str, object]:
    """ZeRO-1 state: each per-element state's piece of a parameter's flat view, cut into the
    rectangles of the full tensor it covers; each bucket's scalar state under every parameter."""
    out: dict[str, object] = {}
    for shard in optimizer.state_blocks():
        for p, a, b, state in shard.pieces:
            name, pl = names[id(p)], place[names[id(p)]]
            for key, v in state.items():
                entry = out.setdefault(f"optim/{name}/{key}", Blocks(pl.global_shape))
                pos = 0
                for offs, sizes in flat_range_blocks(p.shape, a, b):
                    n = math.prod(sizes)
                    entry.add([o + q for o, q in zip(offs, pl.offsets)], v[pos:pos + n].view(sizes))
                    pos += n
        for p in shard.params:  # the bucket's step counter stands for each of its parameters
            for key, v in shard.scalars.items():
                out[f"optim/{names[id(p)]}/{key}"] = v
    return out


def optimizer_entries(model: nn.Module, optimizer, place: dict[str, Placement]) -> dict[str, object]:
    """The optimizer's state as logical tensors (call `ensure_state` first when loading)."""
    names = {id(p): n for n, p in model.named_parameters()}
    if isinstance(optimizer, ZeroOptimizer):
        return _zero_entries(names, optimizer, place)
    out: dict[str, object] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = names[id(p)]
            for key, v in _state_items(optimizer.state.get(p, {})):
                if v.dim() and v.shape != p.shape:
                    raise TypeError(f"optimizer state {key!r} of {name} has shape {list(v.shape)}, the parameter "
                                    f"{list(p.shape)}; only per-element state can be checkpointed")
                out[f"optim/{name}/{key}"] = v if not v.dim() else _entry(v, place[name])
    return out


def refresh_zero_shards(optimizer) -> None:
    """After loading parameters: ZeRO-1 keeps an fp32 copy of its shard of them; refill it."""
    if isinstance(optimizer, ZeroOptimizer):
        optimizer.reload_shards()


# --- random-number generators -------------------------------------------------------------------

def rng_entries(rank: int, device: str) -> dict[str, torch.Tensor]:
    host = {"python": _jsonable(random.getstate()), "numpy": _jsonable(np.random.get_state())}
    out = {f"rng/rank{rank}/torch": torch.get_rng_state(),
           f"rng/rank{rank}/host": torch.frombuffer(bytearray(json.dumps(host).encode()), dtype=torch.uint8)}
    mod = _device_module(device)
    if mod is not None:
        out[f"rng/rank{rank}/device"] = mod.get_rng_state()
    return out


def rng_targets(rank: int, sizes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Empty tensors to load this rank's RNG states into (sizes from the checkpoint's metadata)."""
    prefix = f"rng/rank{rank}/"
    return {k: torch.empty(s, dtype=torch.uint8) for k, s in sizes.items() if k.startswith(prefix)}


def apply_rng(rank: int, loaded: dict[str, torch.Tensor], device: str) -> bool:
    """Restore this rank's RNG states; False when the checkpoint has none for this rank."""
    prefix = f"rng/rank{rank}/"
    if prefix + "torch" not in loaded:
        return False
    torch.set_rng_state(loaded[prefix + "torch"])
    host = json.loads(bytes(loaded[prefix + "host"].tolist()).decode())
    random.setstate(_tuplify(host["python"]))
    np_state = host["numpy"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    mod = _device_module(device)
    if mod is not None and prefix + "device" in loaded:
        mod.set_rng_state(loaded[prefix + "device"])
    return True


def _device_module(device: str):
    if device in ("cuda", "npu"):
        return getattr(torch, device, None)
    return None


def _jsonable(x):
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (tuple, list)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.generic):
        return x.item()
    return x


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, list) else x


def size_problems(entries: dict[str, object], sizes: dict[str, torch.Size]) -> list[str]:
    """Why `entries` cannot be loaded from a checkpoint whose metadata lists `sizes` (missing keys,
    different full shapes); empty when they fit."""
    problems = []
    for key, obj in entries.items():
        if key not in sizes:
            problems.append(f"{key} is not in the checkpoint")
        elif torch.Size(sizes[key]) != torch.Size(obj.size()):
            problems.append(f"{key} has shape {list(sizes[key])} in the checkpoint but {list(obj.size())} here")
    return problems
