"""Agent Gateway data plane: enforces endpoint authentication and proxies to agents."""
