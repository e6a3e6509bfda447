"""`python -m launch.torchrun [torchrun options] -m launch.train ...`: torchrun, except that SIGTERM
and SIGINT end the run cleanly, with exit status 0.

Why not plain torchrun: its agent turns SIGTERM into a `SignalException`, forwards the signal, waits
`--shutdown-timeout` (30 s) and SIGKILLs the ranks still saving, then re-raises, so torchrun exits 1
with a traceback even when every rank saved and exited 0. That cannot be changed from inside the
ranks. Here the first SIGTERM or SIGINT is only forwarded to the ranks (each runs in a session of its
own, so nothing else reaches them): they finish the step, save and exit 0, the agent sees a
successful run, and the launcher returns 0. A second signal, or one that comes before any rank has
started, takes torchrun's own path (immediate shutdown, exit 1). A rank still starting up when the
signal arrives has no handler yet and dies of it, which the agent reports as a failure.
"""
from __future__ import annotations

import os
import signal
import sys
from typing import Optional

from torch.distributed.elastic.multiprocessing import api as elastic_api
from torch.distributed.run import main as torchrun_main

GRACEFUL = (signal.SIGTERM, signal.SIGINT)
_forwarded: set[int] = set()


def _children() -> list[int]:
    """Pids of this process's children (the ranks torchrun started), from /proc."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])  # the name in (...) may hold spaces
        except (OSError, ValueError, IndexError):
            continue
        if ppid == os.getpid():
            pids.append(int(entry))
    return pids


def _forward(signum: int, frame) -> None:
    ranks = _children()
    if signum in _forwarded or not ranks:
        elastic_api._terminate_process_handler(signum, frame)  # torchrun's own handling: raises
    _forwarded.add(signum)
    print(f"launcher: {signal.Signals(signum).name} forwarded to {len(ranks)} ranks; they save and exit "
          "(send it again to stop them at once)", file=sys.stderr, flush=True)
    for pid in ranks:
        try:
            os.killpg(pid, signum)  # each rank leads its own process group, as torchrun starts it
        except ProcessLookupError:
            pass


def main(argv: Optional[list[str]] = None) -> int:
    # torchrun installs its handler for every signal in --signals-to-handle each time it starts
    # ranks; leave SIGTERM/SIGINT out of its default list so ours stays.
    os.environ.setdefault("PET_SIGNALS_TO_HANDLE", "SIGHUP,SIGQUIT")
    for sig in GRACEFUL:
        signal.signal(sig, _forward)
    torchrun_main(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
