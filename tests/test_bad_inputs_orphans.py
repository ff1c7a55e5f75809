"""kill -9 of the ``reproduce`` driver: no process of the run (workers, resource tracker) is alive 10 s later."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a live process, None when it is gone (a zombie counts as gone)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    state, ppid = text.rsplit(")", 1)[1].split()[:2]
    return None if state in ("Z", "X") else (state, int(ppid))


def descendants(root: int) -> set[int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            st = _stat(int(entry.name))
            if st is not None:
                parents[int(entry.name)] = st[1]
    found, frontier = set(), {root}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier} - found
        found |= frontier
    return found


def test_kill_9_of_the_driver_leaves_no_process_of_the_run(tmp_path):
    cmd = [sys.executable, "-m", "intertwiners.cli", "reproduce", "--scale", "smoke", "--workers", "2",
           "--out", str(tmp_path / "run"), "--quiet", "--no-report", "--device", "cpu"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seen: set[int] = set()
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            seen |= descendants(proc.pid)
            # two workers and the resource tracker, and the workers busy with their first jobs
            if len(seen) >= 3 and (tmp_path / "run" / "results.sqlite").exists():
                time.sleep(2.0)
                seen |= descendants(proc.pid)
                break
            time.sleep(0.2)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
        assert len(seen) >= 2, f"no workers were started: {seen}"
        os.kill(proc.pid, signal.SIGKILL)      # the driver only, as `kill -9 PID` would
        proc.wait()
        deadline = time.time() + 10
        alive = {p for p in seen if _stat(p) is not None}
        while alive and time.time() < deadline:
            time.sleep(0.2)
            alive = {p for p in seen if _stat(p) is not None}
        assert not alive, f"processes of the run still alive 10 s after kill -9 of the driver: {sorted(alive)}"
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in seen:                          # only processes this test started
            if _stat(p) is not None:
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
