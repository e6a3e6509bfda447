"""The step's costs outside the layers: a pipeline hand-off of one micro-batch's activations, and the
data-parallel gradient reduction, parameter all-gather and optimizer step of one rank. `cost.py`
caches and schedules them."""
from __future__ import annotations

from simulator import comm as C
from simulator.hardware import HardwareProfile
from simulator.layer_cost import SimOptions
from simulator.layout import Derived, Layout


def p2p_time(model, hw: HardwareProfile, b: int, lay: Layout, d: Derived) -> float:
    """Seconds to send one micro-batch's hidden states to the next pipeline stage."""
    stride = d.strides["pp"]
    crosses = stride >= d.devices_per_node or stride * lay.pp > d.devices_per_node
    sp = lay.tp if lay.sequence_parallel else 1
    nbytes = lay.micro_batch_size * lay.seq_len / (lay.cp * sp) * model.hidden_size * b
    return C.p2p(nbytes, crosses).time(hw)


def dp_step_times(hw: HardwareProfile, o: SimOptions, b: int, lay: Layout, d: Derived, dense: float,
                  expert: float, tensors: int) -> tuple[float, float, float]:
    """(gradient reduction, parameter all-gather, optimizer step) seconds for a rank holding `dense`
    and `expert` parameters in `tensors` tensors; `b` bytes per parameter element."""
    dpn = d.devices_per_node
    gb = 4 if o.grad_reduce_dtype == "fp32" else 2
    ddp, edp, estride, dstride = d.dp * lay.cp, d.edp, d.strides["edp"], d.strides["ddp"]
    if lay.zero1:
        grad = (C.reduce_scatter(dense * gb, ddp, dstride, dpn).time(hw)
                + C.reduce_scatter(expert * gb, edp, estride, dpn).time(hw))
        gather = (C.all_gather(dense * b, ddp, dstride, dpn).time(hw)
                  + C.all_gather(expert * b, edp, estride, dpn).time(hw))
    else:
        grad = (C.all_reduce(dense * gb, ddp, dstride, dpn).time(hw)
                + C.all_reduce(expert * gb, edp, estride, dpn).time(hw))
        gather = 0.0
    if o.grad_bucket_copy:
        # parallel/data_parallel.py: a group of several ranks flattens, scales and unflattens its
        # gradients (a read and a write each); a group of one only divides them by dp in place
        def passes(group: int) -> int:
            return 6 if group > 1 else (2 if d.dp > 1 else 0)
        grad += (passes(ddp) * dense + passes(edp) * expert) * gb / (hw.memory_bandwidth_gbps * 1e9)
    local = dense / ddp + expert / edp if lay.zero1 else dense + expert
    master = 4 if b != 4 else 0
    adam_bytes = local * (4 + 2 * master + 16 + b)  # grad, master r/w, moments r/w, param write
    if lay.optimizer_offload:
        opt = adam_bytes / (hw.host_memory_bandwidth_gbps * 1e9) + local * (4 + b) / hw.host_link.bw
    else:
        opt = adam_bytes / (hw.memory_bandwidth_gbps * 1e9)
    opt += (dense + expert) * 4 / (hw.memory_bandwidth_gbps * 1e9)  # gradient-norm pass for clipping
    if hw.optimizer_cost and not lay.optimizer_offload:  # calibrated: clipping + AdamW step
        opt = tensors * hw.optimizer_cost[0] * 1e-6 + local * hw.optimizer_cost[1] * 1e-9
    return grad, gather, opt
