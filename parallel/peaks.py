"""Quoted dense peak throughput of the accelerators we know: the one table, read by the trainer (the
MFU denominator, `parallel/device.py`) and by the simulator's hardware profiles (`quoted_peak:` in
configs/hardware/*.yaml). Vendor figures, not measurements; CPU peaks are measured instead.
"""
from __future__ import annotations

from typing import Optional

# device name as torch reports it (a substring of it) -> dtype -> dense TFLOP/s of one device
QUOTED_PEAKS_TFLOPS: dict[str, dict[str, float]] = {
    # 910B: 256-313 BF16/FP16 TFLOPS by SKU; 313 used (Pangu Pro MoE quotes 256 for the 800T A2)
    "Ascend910B": {"bf16": 313.0, "fp16": 313.0, "fp32": 78.0},
    "Ascend910_93": {"bf16": 376.0, "fp16": 376.0, "fp32": 94.0},  # A3 super-node die
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp8": 1979.0, "fp32": 67.0},
    "H800": {"bf16": 989.0, "fp16": 989.0, "fp8": 1979.0, "fp32": 67.0},
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp8": 1979.0, "fp32": 67.0},
}


def quoted_peak(device_name: str) -> Optional[tuple[str, dict[str, float]]]:
    """(table key, dtype -> TFLOP/s) for the first known device named in `device_name`, else None."""
    for key, peaks in QUOTED_PEAKS_TFLOPS.items():
        if key in device_name:
            return key, peaks
    return None
