"""Run a function on N gloo processes on this machine and collect what each rank returns.

`run_distributed(fn, world, *args)` starts `world` processes (forkserver: the server imports torch
once, so each rank starts in a fraction of a second instead of re-importing torch), initialises a
gloo process group over a file store in a temporary directory (no ports to collide), calls
`fn(*args)` on each rank, and returns the list of per-rank results (anything torch.save can write).
A failure on any rank raises with that rank's traceback; a hang is killed after `timeout` seconds.
`fn` must be a module-level function (it is pickled by name). `rel_diff` is how the equivalence tests
compare a tensor with the reference.
"""
from __future__ import annotations

import multiprocessing as mp
import tempfile
import time
import traceback
from pathlib import Path

import torch

_PRELOAD = ["torch", "torch.distributed", "moe.model", "parallel.runtime", "numpy"]


def _context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def _entry(fn, rank: int, world: int, tmp: str, args: tuple) -> None:
    import torch.distributed as dist
    out = Path(tmp) / f"rank{rank}.pt"
    try:
        torch.set_num_threads(1)  # N ranks share few cores: oversubscription only slows everyone
        dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
        try:
            result = fn(*args)
        finally:
            dist.destroy_process_group()
        torch.save({"ok": True, "result": result}, out)
    except BaseException:
        torch.save({"ok": False, "error": traceback.format_exc()}, out)


def run_distributed(fn, world: int, *args, timeout: float = 180.0) -> list:
    ctx = _context()
    with tempfile.TemporaryDirectory(prefix="ultramoe-dist-") as tmp:
        procs = [ctx.Process(target=_entry, args=(fn, r, world, tmp, args), daemon=True) for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for r in hung:
            procs[r].kill()
            procs[r].join()
        outcomes = []
        for r in range(world):
            path = Path(tmp) / f"rank{r}.pt"
            outcomes.append(torch.load(path, weights_only=False) if path.exists() else None)
    errors = [f"rank {r}:\n{o['error']}" for r, o in enumerate(outcomes) if o is not None and not o["ok"]]
    if errors:
        raise RuntimeError("distributed run failed\n" + "\n".join(errors))
    if hung:
        raise TimeoutError(f"ranks {hung} still running after {timeout:.0f}s (a collective mismatch hangs)")
    missing = [r for r, o in enumerate(outcomes) if o is None]
    if missing:
        raise RuntimeError(f"ranks {missing} exited without a result (exit codes "
                           f"{[procs[r].exitcode for r in missing]})")
    return [o["result"] for o in outcomes]


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||, the relative difference the equivalence tests bound."""
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def assert_same_training(got: dict, want: dict, tol: float, what: str) -> None:
    """Two runs' per-step "loss" and "norm" lists and final "params" agree within `tol` relative."""
    for step, (a, b) in enumerate(zip(got["loss"], want["loss"])):
        assert abs(a - b) <= tol * abs(b), f"{what} step {step}: loss {a} vs {b}"
    for step, (a, b) in enumerate(zip(got["norm"], want["norm"])):
        assert abs(a - b) <= tol * abs(b), f"{what} step {step}: gradient norm {a} vs {b}"
    assert len(got["loss"]) == len(want["loss"]) and len(got["norm"]) == len(want["norm"])
    for name, p in want["params"].items():
        rel = rel_diff(got["params"][name], p)
        assert rel <= tol, f"{what}: final {name} differs by {rel:.2e} (relative)"
