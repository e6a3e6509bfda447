"""Memory policies applied to a built model, and memory measured per step.

`MemoryManager(model, cfg, device)` applies the recipe's `memory:` section from the outside
(parallel/recompute.py, parallel/swap.py); `with manager.step(): ...` around one training step
counts what autograd saves for backward, and `manager.metrics(model, optimizer)` reports it:

- `mem_saved_activation_peak_bytes`: the peak over the step of the bytes of activations held for
  backward, unique storages (a tensor saved by two ops counts once; parameters and buffers are
  not activations). Counted by saved-tensor hooks around the whole step: each saved tensor's
  handle adds its storage when packed and removes it when autograd frees it. Tensors a recompute
  region drops never reach these hooks (checkpoint's own hooks hold them); swapped ones are
  counted in `mem_swapped_bytes` instead.
- `mem_swapped_bytes`: bytes copied to host by the swap regions this step.
- `mem_param_bytes`, `mem_grad_bytes` (largest gradient total seen this step),
  `mem_optimizer_device_bytes`, `mem_optimizer_host_bytes`, `mem_peak_rss_bytes` (process peak).
"""
from __future__ import annotations

import contextlib
import resource
import sys

import torch
from torch import nn

from parallel.memory_config import MemoryConfig
from parallel.recompute import apply_recompute
from parallel.swap import HostSwap, apply_swap
from moe.attention import GQA, MLA
from moe.layer import GroupedExperts
from moe.layers import SwiGLU

SWAP_TARGETS = {
    "attention": ((MLA, "forward"), (GQA, "forward")),
    "core_attention": ((MLA, "core_attention"), (GQA, "core_attention")),
    "expert_ffn": ((GroupedExperts, "forward"),),
    # the two halves, not forward: the MoE layer calls them apart around its exchanges
    "mlp": ((SwiGLU, "gate_up"), (SwiGLU, "act_down")),
}


class _Held:
    """A saved tensor as autograd keeps it; its storage is counted while this handle lives."""

    __slots__ = ("t", "key", "tracker")

    def __init__(self, tracker: "SavedTracker", t: torch.Tensor, key: int):
        self.t, self.key, self.tracker = t, key, tracker

    def __del__(self):
        self.tracker._release(self.key)


class SavedTracker:
    active: "SavedTracker | None" = None  # the tracker counting this step, if any

    def __init__(self):
        self.static: set[int] = set()
        self._refs: dict[int, list] = {}  # storage pointer -> [handles alive, bytes]
        self.live = self.peak = 0

    def reset(self, model: nn.Module) -> None:
        self.static = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
        self.peak = self.live

    def is_static(self, t: torch.Tensor) -> bool:
        return t.untyped_storage().data_ptr() in self.static

    def pack(self, t: torch.Tensor):
        if self.is_static(t) or t.layout != torch.strided:
            return t
        storage = t.untyped_storage()
        key = storage.data_ptr()
        ref = self._refs.get(key)
        if ref is None:
            ref = self._refs[key] = [0, storage.nbytes()]
            self.live += ref[1]
            self.peak = max(self.peak, self.live)
        ref[0] += 1
        return _Held(self, t, key)

    @staticmethod
    def unpack(h):
        return h.t if isinstance(h, _Held) else h

    def _release(self, key: int) -> None:
        ref = self._refs.get(key)
        if ref is None:
            return
        ref[0] -= 1
        if ref[0] == 0:
            del self._refs[key]
            self.live -= ref[1]

    @contextlib.contextmanager
    def hooks(self):
        SavedTracker.active = self  # for saved-tensor hooks nested inside (sequence_parallel.py)
        try:
            with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
                yield
        finally:
            SavedTracker.active = None


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def optimizer_bytes(optimizer) -> tuple[int, int]:
    """(device, host) bytes of optimizer state; host-side optimizers say theirs (parallel/offload.py)."""
    for opt in (optimizer, getattr(optimizer, "inner", None)):  # ZeRO-1 offloads its inner optimizer
        if hasattr(opt, "state_bytes"):
            return opt.state_bytes()
    state = optimizer.state
    return _bytes(t for s in state.values() for t in s.values() if torch.is_tensor(t)), 0


def peak_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB, macOS bytes


class MemoryManager:
    def __init__(self, model: nn.Module, cfg: MemoryConfig, device: str = "cpu"):
        self.cfg = cfg
        self.tracker = SavedTracker() if cfg.measure else None
        whole = apply_recompute(model, list(cfg.recompute), cfg.full_layers)
        self.swap = None
        if cfg.swap:
            fallback = (self.tracker.pack, self.tracker.unpack) if self.tracker else None
            static = self.tracker.is_static if self.tracker else _static_of(model)
            self.swap = HostSwap(device, static, fallback, prefetch=cfg.swap_prefetch)
            targets = [t for k in cfg.swap for t in SWAP_TARGETS[k]]
            apply_swap(model, self.swap, targets, whole)
        self._grad_bytes = 0
        self._grad_seen: set[int] = set()
        if self.tracker:
            for p in model.parameters():
                if p.requires_grad:
                    p.register_post_accumulate_grad_hook(self._on_grad)

    def _on_grad(self, p: torch.Tensor) -> None:
        if id(p) not in self._grad_seen:
            self._grad_seen.add(id(p))
            self._grad_bytes += p.grad.numel() * p.grad.element_size()

    @contextlib.contextmanager
    def step(self, model: nn.Module):
        """Around one training step: forward, backward and the optimizer step."""
        if self.swap:
            self.swap.reset()
        self._grad_bytes, self._grad_seen = 0, set()
        if self.tracker is None:
            yield
            return
        self.tracker.reset(model)
        with self.tracker.hooks():
            yield

    def metrics(self, model: nn.Module, optimizer) -> dict:
        if self.tracker is None:
            return {}
        dev, host = optimizer_bytes(optimizer)
        return {"mem_saved_activation_peak_bytes": self.tracker.peak,
                "mem_swapped_bytes": self.swap.swapped_bytes if self.swap else 0,
                "mem_param_bytes": _bytes(model.parameters()), "mem_grad_bytes": self._grad_bytes,
                "mem_optimizer_device_bytes": dev, "mem_optimizer_host_bytes": host,
                "mem_peak_rss_bytes": peak_rss_bytes()}


def _static_of(model: nn.Module):
    ptrs = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    return lambda t: t.untyped_storage().data_ptr() in ptrs


def apply_memory(model: nn.Module, cfg: MemoryConfig, device: str = "cpu") -> MemoryManager | None:
    """The manager for `cfg`, or None when nothing is asked (no policy, no measurement)."""
    if not cfg.active and not cfg.measure:
        return None
    return MemoryManager(model, cfg, device)

