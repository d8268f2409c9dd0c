"""Layer 1: is a sched_ext scheduler safe to load? Static checks on the untrusted source, a compile
in the toolchain jail, ELF/BTF checks against the target kernel, and the real kernel verifier.

    from schedcp_mcp.verify import verify_source, verify_policy
    report = verify_source(open("my.bpf.c").read(), params={"slice_ns": "5000000"})
    report.verdict, report.stage, report.errors
"""

from .models import Layer1Report, ProgramInfo, VerifyError
from .pipeline import verify_policy, verify_source

__all__ = ["Layer1Report", "ProgramInfo", "VerifyError", "verify_policy", "verify_source"]
