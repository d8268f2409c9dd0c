"""A scheduler that calls scx_bpf_error() without recording a UEI (no exit callback): its exit is still
told in its own words, read from the kernel log lines after `disabled (scx_bpf_error)` — the script
runs in a real shell against a recorded kernel log (the VM version: tests/test_deploy.py)."""

from __future__ import annotations

import os
import subprocess

from schedcp_mcp.sandbox import scheduler

DMESG = """\
[   12.100000] sched_ext: BPF scheduler "error_later" enabled
[   44.527114] sched_ext: BPF scheduler "error_later" disabled (scx_bpf_error)
[   44.527120] sched_ext: error_later: schedcp test: deliberate error after 40 s
[   44.527125]   scx_bpf_error_bstr+0x6a/0x90
[   44.527127]   bpf_prog_3b1c_error_later_running+0x5d/0x61
[   44.527129]   bpf__sched_ext_ops_running+0x4b/0xa0
[   44.600000] random: crng reseeded
[   45.000000] something else entirely
"""


def run_exit_script(tmp_path, log: str) -> str:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "dmesg").write_text(f"#!/bin/sh\ncat <<'EOF'\n{log}EOF\n")
    (bin_dir / "dmesg").chmod(0o755)
    files = scheduler.Files(str(tmp_path))
    return subprocess.run(["/bin/sh", "-c", scheduler.exit_script(files)], capture_output=True, text=True,
                          env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}, timeout=30).stdout


def test_the_kernels_message_and_backtrace_reach_the_exit_without_a_uei(tmp_path):
    r = scheduler.parse_exit(run_exit_script(tmp_path, DMESG), "error_later")
    ex = r.exit
    assert ex.kind == "error" and ex.message == ""  # no UEI: the loader had nothing to say
    assert ex.kernel_line.endswith('BPF scheduler "error_later" disabled (scx_bpf_error)')
    assert ex.kernel_message.splitlines() == [
        "sched_ext: error_later: schedcp test: deliberate error after 40 s",
        "scx_bpf_error_bstr+0x6a/0x90", "bpf_prog_3b1c_error_later_running+0x5d/0x61",
        "bpf__sched_ext_ops_running+0x4b/0xa0"]
    said = ex.describe()
    assert "schedcp test: deliberate error after 40 s" in said and "scx_bpf_error_bstr" in said
    assert "crng" not in said


def test_a_stall_keeps_only_its_own_line(tmp_path):
    log = ('[ 44.5] sched_ext: BPF scheduler "lean" disabled (runnable task stall)\n'
           "[ 44.6] sched_ext: lean: kworker/0:1[42] failed to run for 3.012s\n"
           "[ 44.7] audit: something\n")
    ex = scheduler.parse_exit(run_exit_script(tmp_path, log), "lean").exit
    assert ex.kind == "stall" and ex.kernel_message == "sched_ext: lean: kworker/0:1[42] failed to run for 3.012s"
