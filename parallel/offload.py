"""Optimizer offload: fp32 master weights and Adam moments on the host, the step on the host, and
only the (possibly low-precision) weights copied back to the device, in chunks.

`offload_optimizer(optimizer, cfg)` wraps the trainer's AdamW, or the inner optimizer of a ZeRO-1
`ZeroOptimizer` (parallel/zero.py), so each rank offloads only its own shard. The host step is
`deepspeed.ops.adam.DeepSpeedCPUAdam` when the `deepspeed` extra is importable (`host_optimizer:
auto` or `deepspeed`), else torch's AdamW with the wrapped optimizer's own settings (fused on
CPU): with fp32 parameters that is the same arithmetic as the on-device step.

Chunks: each parameter is copied back `offload_chunk_mb` at a time, so the device never holds
more than one chunk of conversion temporaries at once, however large the parameter.
"""
from __future__ import annotations

from collections.abc import MutableMapping

import torch
from torch import nn

from parallel.memory_config import MemoryConfig, deepspeed_available


def _host_optimizer(kind: str, groups: list[dict], like: torch.optim.Optimizer) -> torch.optim.Optimizer:
    if kind == "deepspeed" or (kind == "auto" and deepspeed_available()):
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        d = like.defaults
        return DeepSpeedCPUAdam(groups, lr=d["lr"], betas=d["betas"], eps=d["eps"],
                                weight_decay=d["weight_decay"], adamw_mode=True)
    return type(like)(groups)  # every hyper-parameter (fused included) travels in the groups


class _GroupView(MutableMapping):
    """A host param group seen from the trainer and the checkpoint code: its `params` are the
    device parameters; every other key (lr, ...) reads and writes the host optimizer's group."""

    def __init__(self, group: dict, params: list):
        self.group, self.params = group, params

    def __getitem__(self, key):
        return self.params if key == "params" else self.group[key]

    def __setitem__(self, key, value):
        if key == "params":
            raise KeyError("params of an offloaded optimizer group are fixed")
        self.group[key] = value

    def __delitem__(self, key):
        del self.group[key]

    def __iter__(self):
        return iter(self.group)

    def __len__(self):
        return len(self.group)


class HostOffloadOptimizer:
    """The trainer-facing optimizer interface (`param_groups`, `step`, `zero_grad`, `state`,
    `state_dict`) over host master copies of the wrapped optimizer's parameters."""

    def __init__(self, optimizer: torch.optim.Optimizer, chunk_bytes: int, kind: str = "auto"):
        if optimizer.state:
            raise ValueError("HostOffloadOptimizer: wrap the optimizer before its first step (its state would be lost)")
        self.chunk_bytes = max(1, int(chunk_bytes))
        self.pairs: list[tuple[nn.Parameter, torch.Tensor]] = []
        groups = []
        for g in optimizer.param_groups:
            masters = []
            for p in g["params"]:
                pin = p.device.type != "cpu" and torch.cuda.is_available()
                m = torch.empty(p.shape, dtype=torch.float32, device="cpu", pin_memory=pin)
                m.copy_(p.detach())
                masters.append(m)
                self.pairs.append((p, m))
            groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": masters})
        self.inner = _host_optimizer(kind, groups, optimizer)
        self.backend = type(self.inner).__name__
        self._groups = [_GroupView(g, list(orig["params"])) for g, orig in zip(self.inner.param_groups,
                                                                              optimizer.param_groups)]
        self._versions = [p._version for p, _ in self.pairs]

    @property
    def param_groups(self) -> list:
        return self._groups

    @property
    def state(self) -> dict:
        """Optimizer state keyed by the device parameter (live host tensors)."""
        return {p: self.inner.state[m] for p, m in self.pairs if m in self.inner.state}

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, sd: dict) -> None:
        self.inner.load_state_dict(sd)

    @torch.no_grad()
    def step(self) -> None:
        for i, (p, m) in enumerate(self.pairs):
            if p._version != self._versions[i]:  # written since our copy-back (a checkpoint load)
                m.copy_(p.detach())
            m.grad = None if p.grad is None else p.grad.detach().to("cpu", torch.float32, non_blocking=True)
        if any(p.device.type == "cuda" for p, _ in self.pairs):
            torch.cuda.synchronize()  # the gradient copies are complete before the host step reads them
        self.inner.step()
        for p, m in self.pairs:
            self._copy_back(p, m)
        self._versions = [p._version for p, _ in self.pairs]

    def _copy_back(self, p: torch.Tensor, m: torch.Tensor) -> None:
        step = max(1, self.chunk_bytes // max(1, p.element_size()))
        flat_p, flat_m = p.detach().view(-1), m.view(-1)
        for a in range(0, flat_m.numel(), step):
            flat_p[a:a + step].copy_(flat_m[a:a + step])  # dtype conversion per chunk, bounded temporaries

    @torch.no_grad()
    def refresh_masters(self) -> None:
        """Copy the device parameters into the host masters (after a checkpoint loaded them)."""
        for p, m in self.pairs:
            m.copy_(p.detach())
        self._versions = [p._version for p, _ in self.pairs]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p, m in self.pairs:
            m.grad = None
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    def state_bytes(self) -> tuple[int, int]:
        """(device, host) bytes: everything the optimizer holds is on the host."""
        moments = sum(t.numel() * t.element_size() for s in self.inner.state.values() for t in s.values()
                      if torch.is_tensor(t))
        return 0, moments + sum(m.numel() * m.element_size() for _, m in self.pairs)


def offload_optimizer(optimizer, cfg: MemoryConfig):
    """`optimizer` with its step on the host. A ZeRO-1 optimizer keeps its sharding and offloads
    its inner optimizer over this rank's shards (the shards' all-gather stays on the device)."""
    from parallel.zero import ZeroOptimizer
    chunk = int(cfg.offload_chunk_mb * 2**20)
    if isinstance(optimizer, ZeroOptimizer):
        host = optimizer.inner = HostOffloadOptimizer(optimizer.inner, chunk, cfg.host_optimizer)
        reload = optimizer.reload_shards

        def reload_shards():  # a checkpoint refilled the shards: the host masters follow
            reload()
            host.refresh_masters()
        optimizer.reload_shards = reload_shards
        return optimizer
    return HostOffloadOptimizer(optimizer, chunk, cfg.host_optimizer)
