"""The benchmarks, in one room: the sandbox benchmarks as supervised jobs (`runs`), the A/A noise and
interval tables of validation (`validate`), layer 1's and synthesis' throughput (`verify`, `synth`),
the supervisor's own (`jobs`) and what the MCP tools cost an agent (`tools`). They sit above the
domain they measure; nothing below imports them."""
