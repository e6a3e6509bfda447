"""Where training metrics go: a JSONL file (one object per logged step), TensorBoard event files,
and a short line on the progress bar. Only rank 0 writes."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional


class MetricsLogger:
    def __init__(self, out_dir: str | Path, tensorboard: bool = True, enabled: bool = True,
                 resume_step: int = 0):
        """`resume_step` > 0 keeps the earlier run's records up to that step and appends after them;
        records past it belong to steps that will be trained again and are dropped."""
        self.enabled = enabled
        self.jsonl_path = Path(out_dir) / "metrics.jsonl"
        self._file = None
        self._tb = None
        if not enabled:
            return
        self.jsonl_path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step > 0 and self.jsonl_path.is_file():
            kept = [line for line in self.jsonl_path.read_text().splitlines()
                    if _step_of(line) is not None and _step_of(line) <= resume_step]
        self._file = self.jsonl_path.open("w")
        self._file.writelines(line + "\n" for line in kept)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            # purge_step drops TensorBoard events past the resume point, like the JSONL records.
            self._tb = SummaryWriter(log_dir=str(Path(out_dir) / "tensorboard"),
                                     purge_step=resume_step + 1 if resume_step > 0 else None)

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record, bad = finite_or_null({"step": step, **metrics})
        if bad:
            record["nonfinite"] = bad
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(key, value, step)
                elif isinstance(value, list):
                    for i, v in enumerate(value):
                        self._tb.add_scalar(f"{key}/{i}", v, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def finite_or_null(record: dict) -> tuple[dict, list[str]]:
    """`record` with NaN/Inf (also inside lists) replaced by null, and the keys where that happened:
    json.dumps would write a bare NaN, which is not JSON and breaks strict readers (jq, pandas)."""
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        return [clean(x) for x in v] if isinstance(v, list) else v
    out = {k: clean(v) for k, v in record.items()}
    return out, [k for k in record if out[k] != record[k]]  # a changed value held a NaN or Inf


def _step_of(line: str) -> Optional[int]:
    """The step of one JSONL record; None for a line cut short by a crash mid-write."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def short_line(m: dict) -> str:
    return (f"lm loss {m['lm_loss']:.4f} aux {m['aux_loss']:.4f} | {m['tokens_per_s']:.0f} tok/s "
            f"| MFU {100 * m['mfu']:.1f}% | max/mean load {m['max_imbalance']:.2f}")


def imbalance(load_E) -> Optional[float]:
    """max load / mean load; 1.0 is perfect balance."""
    mean = float(load_E.float().mean())
    return float(load_E.max()) / mean if mean > 0 else None
