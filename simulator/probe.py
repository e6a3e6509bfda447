"""Speed probe: a short, fixed workload that measures how fast this machine runs *right now*.

A shared VM drifts: the same training step measured 163 ms and 207 ms a minute apart on the
2-core development machine (other tenants of the host, not this process). A profile calibrated
minutes earlier cannot know that, so `validate` runs this probe between training steps, on every
rank at once, and compares it with the probe taken during calibration. The ratio scales the
profile's compute-side rates for that case: the simulator then predicts
the step on the machine as it was during the step, with the concurrency of the case's ranks
included. The probe is the same for every case and knows nothing of the model being validated
(its shapes are fixed here), so it corrects for the machine, not for the cost model's errors.

The probe is a few linear layers, forward + backward: the fastest of two short batches (about 10 ms
each), timed by `opbench.timed` (thread CPU time with one torch thread, as the calibration is).
GEMMs are the repeatable kind of work here: the same element-wise probe ran between 2.8 and 4.4 ms
in one process, depending on what the allocator had done before, while the GEMM probe stayed
within 6 %.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from simulator.opbench import timed

GEMM_SHAPES = ((512, 192, 192), (512, 192, 512), (1024, 96, 192))  # (tokens, in, out), fwd + bwd


class SpeedProbe:
    """Tensors allocated once, so that each `run` times only the work."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.gemms = [(torch.randn(m, k, generator=g, requires_grad=True),
                       torch.randn(n, k, generator=g, requires_grad=True)) for m, k, n in GEMM_SHAPES]

    def _gemm(self) -> None:
        for x, w in self.gemms:
            F.linear(x, w).sum().backward()

    def run(self, min_s: float = 0.01) -> float:
        """Seconds per call."""
        return timed(self._gemm, min_s=min_s, batches=2)
