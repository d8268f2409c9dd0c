"""The workload catalogue moved to its own room, `schedcp_mcp.workloads` (below validate, learn,
deploy and the rest that name workloads). This re-export keeps the old path working for one more
round of merges; import from `schedcp_mcp.workloads`."""

from ..workloads import *  # noqa: F401,F403
from ..workloads import (GUARDS, PARSERS, PROBE_GUEST, PROBE_SRC, WORKLOADS, Workload,  # noqa: F401
                         built_in_toolchain, ensure_probe, get_workloads, host_commands, list_workloads,
                         parse, parse_hackbench, parse_probe_time, parse_stress_ng_metrics)
