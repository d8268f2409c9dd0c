"""Repository policies under a scenario that broke one: a task runs alone for a while, then others
arrive. Judged by the kernel's own watchdog (a runnable task not run for 3 s disables the
scheduler) and by how much CPU the first task still gets."""

from __future__ import annotations

import re

import pytest

from schedcp_mcp.repository.policies import list_policies
from schedcp_mcp.sandbox import scheduler

OURS = [p.name for p in list_policies() if p.kind == "schedcp"]

# A lone CPU hog for 4 s (nothing else waits, so the kernel refills its slice and no
# stopping/running pair marks the time), then 6 more hogs for 6 s on the 2 vCPUs.
LOADER = scheduler.Files("/run/scenario")
SCENARIO = scheduler.PRELUDE + scheduler.start_script("obj.bpf.o", {}, LOADER, timeout_ms=3000) + r"""
sh -c 'while :; do :; done' &
solo=$!
sleep 4
others=""
for n in 1 2 3 4 5 6; do sh -c 'while :; do :; done' & others="$others $!"; done
set -- $(cat /proc/$solo/stat); t0=${14}
sleep 6
set -- $(cat /proc/$solo/stat); t1=${14}
echo "state=$(cat $SX/state) ops=$(cat $SX/root/ops 2>/dev/null) solo_ticks=$((t1 - t0))"
kill $solo $others
""" + scheduler.stop_script(LOADER) + """
dmesg | grep -i 'sched_ext' | tail -3
"""


def run_scenario(vm, obj: bytes) -> tuple[str, int, str]:
    res = vm.run(SCENARIO, files={"obj.bpf.o": obj}, timeout_s=60)
    m = re.search(r"state=(\S*) ops=(\S*) solo_ticks=(\d+)", res.stdout)
    assert m, res.stdout + res.stderr
    return m[1], int(m[3]), res.stdout


@pytest.mark.image
@pytest.mark.parametrize("name", OURS)
def test_a_task_that_ran_alone_is_not_starved_when_others_arrive(vm, name):
    from pathlib import Path

    from schedcp_mcp.verify.pipeline import verify_policy

    r = verify_policy(name, vm=vm)
    assert r.accepted, r.errors
    state, solo_ticks, out = run_scenario(vm, Path(r.object_path).read_bytes())
    assert state == "enabled", f"{name} was disabled by the kernel:\n{out}"
    # a fair share is 2 CPUs / 7 hogs of 6 s, ~170 ticks at 100 Hz; starved is ~0
    assert solo_ticks >= 40, f"{name}: the first task got {solo_ticks} ticks in 6 s:\n{out}"
