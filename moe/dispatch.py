"""The token dispatcher interface, and the local (single-device, no expert parallelism) dispatcher.

A dispatcher moves each token copy to the device that holds its expert and brings the results back.
`dispatch` starts the exchange and returns a `Pending` handle; the MoE layer may do independent work
(the shared expert's first half) before calling `Pending.wait()`, which yields the tokens for the local
experts in expert order. `combine_start` sends the expert outputs back; `wait()` on what it returns
gives the weighted sum per token (the layer computes the shared expert's second half in between).
`combine` is the two at once.
Implementations that talk to other devices live in `parallel/dispatchers.py`.
"""
from __future__ import annotations

from typing import Any, Protocol

import torch


class Pending(Protocol):
    def wait(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (x_ND tokens for the local experts in expert order, tokens_per_local_expert)."""


class Waitable(Protocol):
    def wait(self) -> torch.Tensor: ...


class TokenDispatcher(Protocol):
    num_local_experts: int

    def dispatch(self, x_TD: torch.Tensor, expert_idx_TK: torch.Tensor, weights_TK: torch.Tensor) -> Pending: ...

    def combine_start(self, y_ND: torch.Tensor, pending: Pending) -> Waitable: ...

    def combine(self, y_ND: torch.Tensor, pending: Pending) -> torch.Tensor: ...


class Then:
    """`wait()`: `fn` of what `inner.wait()` gives (the step after an exchange), computed once."""

    def __init__(self, inner: Waitable, fn):
        self.inner, self.fn, self._result = inner, fn, None

    def wait(self) -> torch.Tensor:
        if self._result is None:
            self._result = self.fn(self.inner.wait())
        return self._result


class Done:
    """A result that needed no communication."""

    def __init__(self, value: torch.Tensor):
        self.value = value

    def wait(self) -> torch.Tensor:
        return self.value


class Combining:
    """`combine` as `combine_start` then `wait`, for dispatchers that define `combine_start`."""

    def combine(self, y_ND: torch.Tensor, pending) -> torch.Tensor:
        return self.combine_start(y_ND, pending).wait()


class _Ready:
    """A dispatch that needed no communication."""

    def __init__(self, x_ND: torch.Tensor, counts_E: torch.Tensor, state: Any, weights_TK: torch.Tensor):
        self.x_ND, self.counts_E, self.state, self.weights_TK = x_ND, counts_E, state, weights_TK

    def wait(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x_ND, self.counts_E


class LocalDispatcher(Combining):
    """All experts live on this device: permute by expert, and unpermute with the routing weights."""

    def __init__(self, kernels, num_experts: int):
        self.kernels = kernels
        self.num_local_experts = num_experts

    def dispatch(self, x_TD, expert_idx_TK, weights_TK) -> _Ready:
        x_ND, counts_E, state = self.kernels.permute(x_TD, expert_idx_TK, self.num_local_experts)
        return _Ready(x_ND, counts_E, state, weights_TK)

    def combine_start(self, y_ND: torch.Tensor, pending: _Ready) -> Done:
        return Done(self.kernels.unpermute(y_ND, pending.state, pending.weights_TK))
