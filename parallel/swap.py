"""Activation swap: tensors saved for backward inside chosen regions live in host memory between
forward and backward (`torch.autograd.graph.saved_tensors_hooks` around those regions).

On cuda / npu (feature-detected through `torch.<device>`): the device-to-host copy runs on a side
stream into a pinned buffer (`record_stream` keeps the device block from reuse until it is done),
and when backward first unpacks a tensor of a region, the previous region's tensors (the next ones
backward reaches) start their host-to-device copies on the side stream: prefetch. On CPU the same
pack/unpack runs with plain copies into a separate host pool, so the code path is tested; that
device path is thin and cannot run here.

Parameters, buffers and tiny tensors are not swapped (they are not activations, or not worth a
copy); what is not swapped goes to the fallback hooks (the memory tracker's, which count it).
"""
from __future__ import annotations

import contextlib
import weakref
from typing import Callable, Optional

import torch

from parallel.method_wrap import wrap_inner

MIN_SWAP_BYTES = 1024  # smaller saved tensors stay: a copy costs more than it saves


def _dense(t: torch.Tensor) -> bool:
    """Whether t's elements fill its span exactly once in some dimension order (a permuted contiguous tensor)."""
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _host_like(t: torch.Tensor, pin: bool) -> torch.Tensor:
    if _dense(t):  # keep the strides: some backward kernels expect them
        return torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device="cpu", pin_memory=pin)
    return torch.empty(t.size(), dtype=t.dtype, device="cpu", pin_memory=pin)


class _Swapped:
    """One saved tensor's host copy; `get()` returns it on its device."""

    __slots__ = ("host", "device", "ready", "fetched", "region", "__weakref__")

    def __init__(self, host: torch.Tensor, device: torch.device, ready, region: int):
        self.host, self.device, self.ready, self.fetched, self.region = host, device, ready, None, region


class HostSwap:
    def __init__(self, device: torch.device | str, static: Callable[[torch.Tensor], bool],
                 fallback: Optional[tuple[Callable, Callable]] = None, prefetch: bool = True):
        self.device = torch.device(device)
        self.static, self.prefetch = static, prefetch
        self.fallback_pack, self.fallback_unpack = fallback or ((lambda t: t), (lambda h: h))
        mod = getattr(torch, self.device.type, None)
        self.streams = mod if self.device.type != "cpu" and hasattr(mod, "Stream") else None
        self.side = self.streams.Stream() if self.streams is not None else None
        self.swapped_bytes = 0  # this step's bytes copied to host
        self._regions: list[list[weakref.ref]] = []
        self._dedup: dict = {}  # span or layout -> (weakref to the storage's owner, handle, layout), one region

    def reset(self) -> None:
        self.swapped_bytes, self._regions = 0, []

    @contextlib.contextmanager
    def region(self):
        """Swap what is saved for backward inside this block (a module's forward)."""
        self._regions.append([])
        self._dedup = {}
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            yield
        self._dedup = {}

    def _pack(self, t: torch.Tensor):
        nbytes = t.numel() * t.element_size()
        if self.static(t) or nbytes < MIN_SWAP_BYTES or t.layout != torch.strided:
            return ("kept", self.fallback_pack(t))
        # The same elements saved again in this region (by another op, or as another view: two
        # linears share an input, softmax and the next matmul both keep the probabilities) reuse
        # one host copy. A dense view is keyed by the span it fills, so any other dense view of
        # that span is rebuilt from the copy's storage. The entry holds a weak reference to the
        # tensor owning the storage (a view's base): while it lives, the storage cannot have been
        # freed and reused, and the transient views ops save (F.linear's reshape) may die.
        dense = _dense(t)
        ptr = t.untyped_storage().data_ptr()
        key = (ptr, t.storage_offset(), t.numel(), t.dtype) if dense else \
            (ptr, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        hit = self._dedup.get(key)
        if hit is not None and hit[0]() is not None:
            if hit[2] == (tuple(t.shape), t.stride()):
                return ("swap", hit[1])
            return ("view", (hit[1], tuple(t.shape), t.stride()))
        handle = self._copy_out(t)
        self.swapped_bytes += nbytes
        owner = t._base if t._base is not None else t
        self._dedup[key] = (weakref.ref(owner), handle, (tuple(t.shape), t.stride()))
        self._regions[-1].append(weakref.ref(handle))
        return ("swap", handle)

    def _unpack(self, packed):
        kind, h = packed
        if kind == "kept":
            return self.fallback_unpack(h)
        if kind == "view":  # another dense view of a copied span: the copy starts at the span's start
            handle, shape, stride = h
            base = self._unpack(("swap", handle))
            return base.as_strided(shape, stride, base.storage_offset())
        if self.side is None:
            return h.host
        if self.prefetch and h.fetched is None:
            for other in self._regions[h.region - 1] if h.region > 0 else []:
                o = other()
                if o is not None and o.fetched is None:
                    self._fetch(o)
        if h.fetched is None:
            self._fetch(h)
        out, done = h.fetched
        self.streams.current_stream().wait_event(done)
        out.record_stream(self.streams.current_stream())
        return out

    def _copy_out(self, t: torch.Tensor) -> _Swapped:
        region = len(self._regions) - 1
        if self.side is None:
            return _Swapped(_host_like(t, pin=False).copy_(t), self.device, None, region)
        host = _host_like(t, pin=True)
        self.side.wait_stream(self.streams.current_stream())  # t is complete before the copy starts
        with self.streams.stream(self.side):
            host.copy_(t, non_blocking=True)
            ready = self.streams.Event()
            ready.record(self.side)
        t.record_stream(self.side)  # the device block is not reused until the copy is done
        return _Swapped(host, t.device, ready, region)

    def _fetch(self, h: _Swapped) -> None:
        with self.streams.stream(self.side):
            self.side.wait_event(h.ready)
            out = h.host.to(h.device, non_blocking=True)
            done = self.streams.Event()
            done.record(self.side)
        h.fetched = (out, done)


def apply_swap(model: torch.nn.Module, swap: HostSwap, targets: list[tuple[type, str]], skip: set[int]) -> int:
    """Run `targets`' methods inside `swap.region()`; modules whose ids are in `skip` (inside a
    recomputed region: checkpoint's own hooks must stay innermost there) are left alone."""
    wrapped = 0
    for m in model.modules():
        if id(m) in skip:
            continue
        for cls, method in targets:
            if isinstance(m, cls):
                def wrap(fn):
                    def run(*args, **kwargs):
                        with swap.region():
                            return fn(*args, **kwargs)
                    return run
                wrap_inner(m, method, wrap)  # inside TP's f and g (parallel/method_wrap.py)
                wrapped += 1
    return wrapped
