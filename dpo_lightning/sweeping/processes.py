"""Trial processes: started in their own process group, recorded, and ended whole, even by a later runner.

Each trial runs in a new session (``start_new_session``), so Ctrl-C or a terminal hang-up reaches only the
runner, and the trial's whole process group (FSDP workers included) can be ended at once. The group id, the
host and the start times of the trial and of its runner are stored with the trial; when a runner was killed
(SIGKILL, OOM, a lost node) its trials go on running, and the next runner on that host finds them by these
records and ends them before it queues their points again. A start time guards against a recycled pid.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from typing import Any

KILL_GRACE_S = 10.0  # between SIGTERM and SIGKILL


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux ``/proc``), None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])  # field 22 of stat(5)
    except (OSError, IndexError, ValueError):
        return None


def identity(pid: int | None = None) -> dict[str, Any]:
    """What identifies a live process later: host, pid and start time."""
    pid = os.getpid() if pid is None else pid
    return {"host": socket.gethostname(), "pid": pid, "start": start_time(pid)}


def is_alive(who: dict[str, Any]) -> bool:
    """Whether the process ``identity`` described is still running (on this host; False for another)."""
    if who.get("host") != socket.gethostname() or not who.get("pid"):
        return False
    now = start_time(who["pid"])
    return now is not None and (who.get("start") is None or now == who["start"])


def group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs; a dead one not yet reaped (a zombie) does not count."""
    if os.path.isdir("/proc"):  # Linux: by each process's group and state, stat(5) fields 3 and 5
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    state, _, group = f.read().rsplit(")", 1)[1].split()[:3]
            except (OSError, ValueError):  # not a process, or one that just ended
                continue
            if int(group) == pgid and state not in ("Z", "X"):
                return True
        return False
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def end_group(pgid: int, leader_start: int | None, grace: float = KILL_GRACE_S) -> bool:
    """SIGTERM a recorded process group, SIGKILL what is left after ``grace`` s; True if it was running.

    The group's leader is the trial process; if a process with its pid runs with another start time, the
    pid was recycled and nothing is sent. A group whose leader has exited but whose children live on
    keeps its id (Linux does not reuse it), so it is still ended.
    """
    now = start_time(pgid)
    if now is not None and leader_start is not None and now != leader_start:
        return False
    if not group_alive(pgid):
        return False
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and group_alive(pgid):
            _reap(pgid)
            time.sleep(0.05)
        if not group_alive(pgid):
            return True
    return True


def _reap(pid: int) -> None:
    try:  # our own child (a test, or a runner that kept the trial) must be waited for to disappear
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def terminate(proc: subprocess.Popen[bytes], grace: float = KILL_GRACE_S) -> None:
    """SIGTERM a running trial's whole process group, SIGKILL what is left of it after ``grace`` s.

    The group, not only the trial process: a child that outlives its parent (a worker rank, a data loader)
    is ended too. The trial process itself is waited for here, so its exit code stays readable.
    """
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, grace)):
        deadline = time.monotonic() + wait
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(wait if sig == signal.SIGTERM else None)
        except subprocess.TimeoutExpired:
            continue
        while group_alive(proc.pid) and time.monotonic() < deadline:  # the leader is reaped: the others
            time.sleep(0.05)
        if not group_alive(proc.pid):
            return


def describe_exit(code: int) -> str:
    if code >= 0:
        return f"exit code {code}"
    name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
    return f"killed by signal {name}" + (" (out of memory?)" if -code == signal.SIGKILL else "")
