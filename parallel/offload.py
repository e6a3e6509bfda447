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

    @property
    def param_groups(self) -> list[dict]:
        return self.inner.param_groups

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
        for p, m in self.pairs:
            m.grad = None if p.grad is None else p.grad.detach().to("cpu", torch.float32, non_blocking=True)
        if any(p.device.type == "cuda" for p, _ in self.pairs):
            torch.cuda.synchronize()  # the gradient copies are complete before the host step reads them
        self.inner.step()
        for p, m in self.pairs:
            self._copy_back(p, m)

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
        optimizer.inner = HostOffloadOptimizer(optimizer.inner, chunk, cfg.host_optimizer)
        return optimizer
    return HostOffloadOptimizer(optimizer, chunk, cfg.host_optimizer)
