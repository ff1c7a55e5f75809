"""Worker processes never outlive the driver of ``intertwiners reproduce``.

The local backend spawns its workers with ``INTERTWINERS_DRIVER_PID`` set to the driver's pid. The first thing
``import intertwiners`` does (before torch is imported, which takes seconds) is :func:`die_with_driver`: in a
process whose parent is that driver it asks the kernel for SIGKILL when the parent dies (``prctl
PR_SET_PDEATHSIG``, Linux) and starts a watchdog thread that exits the process when its parent pid changes
(any platform), then removes the variable so that the worker's own children are not affected. So kill -9 of
the driver ends every worker at once, even one still starting up; the multiprocessing resource tracker then
sees its last user gone and exits too. Only the standard library is used here.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

DRIVER_ENV = "INTERTWINERS_DRIVER_PID"
PR_SET_PDEATHSIG = 1
WATCHDOG_PERIOD_S = 0.5


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent dies (Linux); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):  # pragma: no cover - no libc prctl
        return False


_watchdog: threading.Thread | None = None


def start_parent_watchdog(parent_pid: int, period_s: float = WATCHDOG_PERIOD_S) -> threading.Thread:
    """A daemon thread that ends this process (``os._exit``) once ``parent_pid`` is no longer its parent."""
    global _watchdog
    if _watchdog is not None and _watchdog.is_alive():
        return _watchdog

    def watch():
        while True:
            if os.getppid() != parent_pid:
                os._exit(1)
            time.sleep(period_s)

    _watchdog = threading.Thread(target=watch, name="intertwiners-parent-watchdog", daemon=True)
    _watchdog.start()
    return _watchdog


def die_with_driver() -> None:
    """In a worker spawned by the driver (``$INTERTWINERS_DRIVER_PID`` is its parent): die with the parent."""
    pid = os.environ.get(DRIVER_ENV, "")
    if not pid.isdigit() or int(pid) != os.getppid():
        return
    os.environ.pop(DRIVER_ENV, None)       # this worker's own children are not the driver's workers
    set_parent_death_signal()
    if os.getppid() != int(pid):           # the driver died before the signal was armed
        os._exit(1)
    start_parent_watchdog(int(pid))
