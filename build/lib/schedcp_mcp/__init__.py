"""schedcp: safe sched_ext scheduler optimization for AI agents (MCP server + CLI)."""

__version__ = "0.1.0"
