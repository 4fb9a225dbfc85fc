"""Governance for agents: tenants and keys, limits, fair queueing, audit (the gateway's stages use it)."""
