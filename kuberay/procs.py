"""Find and stop the processes one simulation started, by pid, and nothing else.

`ray stop` finds Ray processes by name machine-wide and would kill other sessions' Rays. Here
every process of a simulation inherits MARKER=<its id> in its environment (Ray rewrites
process titles, not environments); those and their descendants are the simulation's.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

MARKER = "VISIONSERVE_SIM_ID"


def own_processes(sim_id: str) -> list[int]:
    """Pids of processes started for this simulation: those with our marker in their
    environment (Ray rewrites process titles, not environments) and their descendants."""
    marked, parents = set(), {}
    me = os.getpid()
    needle = f"{MARKER}={sim_id}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        pid = int(entry.name)
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                marked.add(pid)
            stat = (entry / "stat").read_text()
            parents[pid] = int(stat[stat.rindex(")") + 2 :].split()[1])
        except (OSError, ValueError):
            continue  # gone, or not ours to read
    found = set(marked)
    grew = True
    while grew:
        children = {pid for pid, ppid in parents.items() if ppid in found} - found - {me}
        found |= children
        grew = bool(children)
    return sorted(found)


def stop_processes(sim_id: str, grace_s: float = 8.0) -> int:
    """SIGTERM, then SIGKILL, only this simulation's processes; returns how many there were."""
    pids = own_processes(sim_id)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.2)
        pids = [p for p in pids if _alive(p)]
        if not pids:
            break
    return len(pids)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return state[state.rindex(")") + 2] != "Z"
