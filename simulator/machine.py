"""Which machine a CPU profile was measured on, and whether this one is it.

A calibrated profile holds for the machine it was measured on, as that machine was: on a fresh VM
of the same kind the committed profile's validation errors were 22 % median / 38 % worst, and 8 % /
9 % after recalibrating. So `calibrate` records the CPU model, CPU count, torch version and thread
count (`HardwareProfile.measured_on`), and `estimate` / `validate` compare them, and a quick run of
the speed probe against the profile's baseline, with the machine at hand: a mismatch is one
warning line naming what differs and the command that fixes it.
"""
from __future__ import annotations

import os
import platform
from typing import Optional

import torch

# The probe's ratio to its calibration baseline beyond which the profile describes another speed:
# the same machine drifted by up to ~20 % between minutes here (other tenants of the host).
PROBE_TOLERANCE = 1.3
FIX = "re-run `python -m simulator calibrate` (or `simulate validate --calibrate`) on this machine"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def this_machine(threads: int) -> dict:
    """What a profile records about the machine it is measured on."""
    return {"cpu_model": cpu_model(), "cpus": os.cpu_count() or 1, "torch": torch.__version__.split("+")[0],
            "threads": threads}


def profile_mismatch(prof, probe_s: Optional[float] = None, here: Optional[dict] = None) -> Optional[str]:
    """One line saying how CPU profile `prof` does not describe this machine, or None if it does.
    `probe_s`: a speed-probe reading taken now (compared with `prof.speed_probe`)."""
    if prof.device != "cpu":
        return None
    problems = []
    recorded = getattr(prof, "measured_on", None) or {}
    if not recorded:
        problems.append("it does not record the machine it was measured on")
    else:
        here = here or this_machine(recorded.get("threads", prof.cpu_threads or 1))
        for key in ("cpu_model", "cpus", "torch"):
            if key in recorded and recorded[key] != here[key]:
                problems.append(f"{key} {recorded[key]!r} there, {here[key]!r} here")
    if probe_s and prof.speed_probe:
        ratio = probe_s / prof.speed_probe
        if not 1 / PROBE_TOLERANCE <= ratio <= PROBE_TOLERANCE:
            problems.append(f"the speed probe runs {ratio:.2f}x its calibration time")
    if not problems:
        return None
    return f"warning: hardware profile {prof.name!r} may not describe this machine: {'; '.join(problems)}; {FIX}"


def quick_probe(threads: int = 1) -> float:
    """One speed-probe reading now (about 20 ms), at the thread count the calibration used."""
    from simulator.probe import SpeedProbe
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        return SpeedProbe().run()
    finally:
        torch.set_num_threads(before)
