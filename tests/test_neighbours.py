"""A validation says what else used the host's CPUs while it measured (sandbox/neighbours.py): real
processes: one outside this process's tree (a neighbour), the validation's own (its VM), and another
child of this process (another job's VM)."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil

from schedcp_mcp.sandbox import neighbours

SPIN = "import time\nt = time.time()\nwhile time.time() - t < {s}: pass\n"


def _neighbour(seconds: float, tmp_path) -> int:
    """A CPU hog that is not our descendant (setsid -f: its parent exits at once). Its pid."""
    f = tmp_path / "pid"
    subprocess.run(["setsid", "-f", sys.executable, "-c", f"import os; open({str(f)!r}, 'w').write(str(os.getpid()))\n"
                    + SPIN.format(s=seconds)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=10)
    for _ in range(100):
        if f.exists() and f.read_text():
            return int(f.read_text())
        time.sleep(0.05)
    raise AssertionError("the neighbour did not start")


def test_a_neighbour_is_counted_and_named_and_our_own_processes_are_not(tmp_path):
    w = neighbours.Watch()
    own = subprocess.Popen([sys.executable, "-c", SPIN.format(s=2.0)])  # the validation's own (its VM)
    # a child of this process that is not the validation's (another job's VM, a staging VM) competes
    sibling = subprocess.Popen([sys.executable, "-c", SPIN.format(s=4.0)])  # still spinning at the stop
    pid = _neighbour(4.0, tmp_path)  # still spinning when the watch stops
    assert psutil.Process(pid).ppid() != own.pid
    try:
        time.sleep(2.2)
        share = w.stop(own.pid)
    finally:
        psutil.Process(pid).kill()
        own.wait()
        sibling.kill()
        sibling.wait()
    assert share.others_cpu >= 0.3, share  # the neighbour spun most of ~2.2 s (2 CPUs, shared with own)
    assert any(b.startswith("python") and f"[{pid}]" in b for b in share.busiest), share.busiest
    assert not any(f"[{own.pid}]" in b for b in share.busiest)
    assert any(f"[{sibling.pid}]" in b for b in share.busiest), share.busiest
    assert share.cpus == psutil.cpu_count() and len(share.load_avg) == 2
    assert "busy host" in (share.warning() or "")


def test_the_warning_says_what_and_what_to_do_only_above_its_threshold():
    quiet = neighbours.HostShare(seconds=100, cpus=2, others_cpu=0.05)
    assert quiet.warning() is None
    busy = neighbours.HostShare(seconds=100, cpus=2, others_cpu=0.8, busiest=["qemu-system-x86[7] 0.78 CPU"])
    w = busy.warning()
    assert w and "0.80 of 2 CPUs" in w and "qemu-system-x86[7]" in w and "schedcp rollback" in w
    stolen = neighbours.HostShare(seconds=100, cpus=2, others_cpu=0.0, steal_cpu=0.3)
    assert "hypervisor 0.30" in (stolen.warning() or "")
