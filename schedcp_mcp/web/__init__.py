"""What `schedcp serve --http` shows a browser besides the MCP endpoint: the status page."""
