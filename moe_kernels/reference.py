"""Reference MoE kernels: plain PyTorch loops, written to be read and trusted, not to be fast.

Each stage loops over experts (permute, grouped_mm) or over the K routing slots (unpermute), so its
correctness can be checked by eye. Autograd comes from the ordinary ops; nothing custom.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .base import (
    PermuteState,
    accumulation_dtype,
    check_grouped_mm_inputs,
    check_permute_inputs,
    check_unpermute_inputs,
)


class ReferenceKernels:
    name = "reference"

    def permute(self, x_TD: Tensor, expert_idx_TK: Tensor, num_experts: int) -> tuple[Tensor, Tensor, PermuteState]:
        check_permute_inputs(x_TD, expert_idx_TK, num_experts)
        T, K = expert_idx_TK.shape
        assignments, counts = [], []
        for e in range(num_experts):
            # nonzero walks the [T, K] mask row-major, which is exactly the (token, k) order we promise.
            t_idx, k_idx = torch.nonzero(expert_idx_TK == e, as_tuple=True)
            assignments.append(t_idx * K + k_idx)
            counts.append(t_idx.numel())
        assignment_N = torch.cat(assignments)
        token_N = assignment_N // K
        state = PermuteState(
            assignment_N=assignment_N,
            token_N=token_N,
            tokens_per_expert_E=torch.tensor(counts, dtype=torch.int64),
            num_tokens=T,
            topk=K,
        )
        return x_TD[token_N], state.tokens_per_expert_E, state

    def grouped_mm(self, x_ND: Tensor, w_EDF: Tensor, tokens_per_expert_E: Tensor) -> Tensor:
        counts = check_grouped_mm_inputs(x_ND, w_EDF, tokens_per_expert_E)
        pieces = [x_e @ w_EDF[e] for e, x_e in enumerate(torch.split(x_ND, counts))]
        return torch.cat(pieces)

    def unpermute(self, y_ND: Tensor, state: PermuteState, weights_TK: Tensor) -> Tensor:
        check_unpermute_inputs(y_ND, state, weights_TK)
        T, K, N = state.num_tokens, state.topk, state.num_rows
        acc = accumulation_dtype(y_ND.dtype)
        # Row N of y_pad is zeros: dropped (t, k) pairs point at it and so contribute nothing.
        y_pad = torch.cat([y_ND.to(acc), y_ND.new_zeros(1, y_ND.shape[1], dtype=acc)])
        row_of_TK = torch.full((T * K,), N, dtype=torch.int64, device=y_ND.device)
        row_of_TK[state.assignment_N] = torch.arange(N, device=y_ND.device)
        row_of_TK = row_of_TK.view(T, K)
        out_TD = y_pad.new_zeros(T, y_ND.shape[1])
        for k in range(K):
            out_TD = out_TD + weights_TK[:, k : k + 1].to(acc) * y_pad[row_of_TK[:, k]]
        return out_TD.to(y_ND.dtype)
