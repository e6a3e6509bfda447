"""Wrapping a module's methods from outside, in two layers.

Tensor parallelism puts its f and g around a SwiGLU's halves (`gate_up`, `act_down`), which the
MoE layer calls apart; memory policies (recompute, swap) wrap methods too, later. `wrap_outer`
marks a wrapper as outer: `wrap_inner` then goes inside it, so a recomputed region re-runs the
math, never TP's collectives, whatever order the wrappers were applied in.
"""
from __future__ import annotations

from typing import Callable

from torch import nn


class Outer:
    """A method behind an outer wrapper: calls `outer(inner, *args)`."""

    def __init__(self, inner: Callable, outer: Callable):
        self.inner, self.outer = inner, outer

    def __call__(self, *args, **kwargs):
        return self.outer(self.inner, *args, **kwargs)


def wrap_outer(module: nn.Module, name: str, outer: Callable) -> None:
    """`module.<name>(*args)` becomes `outer(previous_method, *args)`."""
    setattr(module, name, Outer(getattr(module, name), outer))


def innermost(module: nn.Module, name: str) -> Callable:
    """The method below every outer wrapper (what `wrap_inner` wraps)."""
    fn = getattr(module, name)
    while isinstance(fn, Outer):
        fn = fn.inner
    return fn


def wrap_inner(module: nn.Module, name: str, make: Callable[[Callable], Callable]) -> None:
    """Replace the method below every outer wrapper by `make(method)`."""
    holder, fn = None, getattr(module, name)
    while isinstance(fn, Outer):
        holder, fn = fn, fn.inner
    if holder is None:
        setattr(module, name, make(fn))
    else:
        holder.inner = make(fn)
