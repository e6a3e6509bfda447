"""Fine-grained recomputation, applied to a built model from the outside.

Each module kind of `MemoryConfig.recompute` names methods of `moe/` modules (see
parallel/memory_config.py); this file replaces them on the instance by the same method run under
`torch.utils.checkpoint.checkpoint(use_reentrant=False)`. The math is unchanged, so losses and
gradients equal the policy-free run's bitwise on CPU. Checkpoint restores the RNG state for the
recomputation (the model has no dropout today; this keeps it right if one is added).

Recomputing a region that holds a router re-runs it in backward; its aux-loss-free load counter
(`load_since_update`) would then count the tokens twice, so a recomputation restores it. Under
expert parallelism a recomputed layer re-runs the dispatch exchange, as MindSpeed's
recompute-everything levels do; every rank recomputes the same layers in the same order, so the
collectives match.

`moe_permute` recomputes `MoELayer.dispatch_up` (local permute, the dispatch exchange under EP,
the routed experts' up-projections) and switches the layer to the order that calls it as one unit
(moe/layer.py: the dispatch exchange then overlaps nothing; the whole shared expert is computed
inside the combine). Backward re-runs the dispatch, its exchange and the two up-projection GEMMs
(checkpoint re-runs the region whole), never the router, when the up-projections' backward first
needs the permuted tokens: at the same point of the graph on every rank, so the re-run exchanges
match. The exchange counts its bytes again then (it does run twice).
"""
from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from moe.attention import GQA, MLA
from moe.block import TransformerBlock
from moe.layer import GroupedExperts, MoELayer
from moe.layers import RMSNorm, SwiGLU
from moe.router import Router
from parallel.method_wrap import innermost, wrap_inner

# kind -> (module class, method name) pairs it recomputes
RECOMPUTE_TARGETS = {
    "norm": ((RMSNorm, "forward"),),
    "swiglu": ((SwiGLU, "act_down"), (GroupedExperts, "act_down")),
    "mla_up": ((MLA, "up_attend"),),
    "core_attention": ((MLA, "core_attention"), (GQA, "core_attention")),
    "expert_ffn": ((GroupedExperts, "forward"),),
    "moe_permute": ((MoELayer, "dispatch_up"),),
    "layer": ((TransformerBlock, "forward"),),
}
# Regions of a module holding a router that do not run it (no token counts to restore).
WITHOUT_ROUTER = {(MoELayer, "dispatch_up")}


def checkpointed(module: nn.Module, method: str) -> None:
    """Replace `module.<method>` by itself under activation checkpointing (idempotent), inside any
    outer wrapper (TP's f and g stay outside the recomputed region; parallel/method_wrap.py)."""
    fn = innermost(module, method)
    if getattr(fn, "_recomputed", False):
        return
    runs_router = not any(isinstance(module, cls) and method == name for cls, name in WITHOUT_ROUTER)
    routers = [m for m in module.modules() if isinstance(m, Router)] if runs_router else []

    @functools.wraps(fn)
    def run(*args):
        calls = []

        def body(*inner):
            calls.append(None)
            if len(calls) == 1 or not routers:
                return fn(*inner)
            # the recomputation in backward: leave the router's token counts as the forward left them
            counts = [r.load_since_update.clone() for r in routers]
            try:
                return fn(*inner)
            finally:
                with torch.no_grad():
                    for r, c in zip(routers, counts):
                        r.load_since_update.copy_(c)
        return checkpoint(body, *args, use_reentrant=False)

    run._recomputed = True
    wrap_inner(module, method, lambda _fn: run)


def stage_layers(model: nn.Module) -> list:
    """The transformer blocks of each pipeline stage this model holds, in order (one stage without pp)."""
    if hasattr(model, "chunks"):
        return [list(c.layers) for c in model.chunks]
    return [list(model.layers)]


def apply_recompute(model: nn.Module, kinds: list[str], full_layers: int = 0) -> set[int]:
    """Wrap the methods `kinds` name; recompute the first `full_layers` blocks of each stage whole.
    Returns the ids of the modules inside wholly recomputed blocks (nothing else applies there)."""
    whole: set[int] = set()
    blocks = [b for m in model.modules() if isinstance(m, TransformerBlock) for b in [m]] if "layer" in kinds else \
        [b for stage in stage_layers(model) for b in stage[:full_layers]]
    for block in blocks:
        checkpointed(block, "forward")
        whole.update(id(m) for m in block.modules())
    for kind in kinds:
        if kind == "layer":
            continue
        for cls, method in RECOMPUTE_TARGETS[kind]:
            for m in model.modules():
                if isinstance(m, cls) and id(m) not in whole:
                    checkpointed(m, method)
                    if kind == "moe_permute":  # the layer must call dispatch_up (its default order does not)
                        m.dispatch_unit = True
    return whole
