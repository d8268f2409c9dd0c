"""Fast checks of layer-3 rules on recorded real outputs (no VM)."""

from __future__ import annotations

import pytest

from schedcp_mcp.deploy.deployments import threshold_from_goals
from schedcp_mcp.deploy.targets import parse_metric
from schedcp_mcp.sandbox.scheduler import parse_exit, parse_state
from schedcp_mcp.errors import InfrastructureError
from schedcp_mcp.observe.profile import Goal

# printed by the sandbox kernel when the watchdog removed a scheduler during a test run
KERNEL_LOG = """[    9.625694] sched_ext: BPF scheduler "starve_comm" disabled (runnable task stall)
[    9.626806] sched_ext: starve_comm: starveme[168] failed to run for 3.772s"""


def goal(metric, direction, r):
    return Goal(metric=metric, direction=direction, target_ratio=r)


def test_rollback_threshold_comes_from_goals():
    assert threshold_from_goals([]) == 1.10
    assert threshold_from_goals([goal("throughput", "higher", 0.8)]) == pytest.approx(1.25)
    assert threshold_from_goals([goal("throughput", "higher", 0.97)]) == 1.05  # noise floor
    assert threshold_from_goals([goal("p99_wakeup_latency_us", "lower", 0.9)]) == 1.05
    assert threshold_from_goals([goal("wall_time_s", "lower", 1.3),
                                 goal("throughput", "higher", 0.8)]) == pytest.approx(1.25)


def test_kernel_disable_reason_is_quoted():
    ex = parse_exit("@@J\n\n@@K\n" + KERNEL_LOG, "starve_comm").exit
    assert ex.kind == "stall" and ex.reason == "runnable task stall"
    assert ex.kernel_line.endswith('"starve_comm" disabled (runnable task stall)')
    assert parse_exit("@@J\n\n@@K\n").exit.kind == "unknown"


def test_state_and_metric_parsing():
    st = parse_state("state=enabled\nops=fifo\nenable_seq=3\npsi=some avg10=1.50 avg60=0.2\n"
                     "ctxt=1234\nuptime=12.5\n")
    assert st.enabled and st.ops == "fifo" and st.enable_seq == 3 and st.psi_some_avg10 == 1.5
    assert parse_metric("Running in process mode with 2 groups\nTime: 1.234\n") == 1.234
    with pytest.raises(InfrastructureError, match="printed no number"):
        parse_metric("nothing here")
